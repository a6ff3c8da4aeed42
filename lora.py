"""Fine-tune Whisper with LoRA adapters on audio + transcript pairs, or evaluate a model (--test).

Example (Telugu, local folders with train/ and validation/):
    python lora.py --model ../shared/models/whisper-base-mlx --data ../shared/data/te \\
        --language te --adapter-path adapters/te --iters 300
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import utils
from utils import number

DEFAULTS_HELP = "(default: %(default)s)"
CONFIG_VERSION = 1
PACK_TAIL_PROB = 0.5  # share of packed windows that end in a clip cut off at 30 s (with --timestamp-prob > 0)


def lora_targets(value: str) -> str:
    """--lora-targets: comma-separated names of a block's Linear layers, each one we know."""
    from models.tuner.lora import VALID_TARGETS

    names = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [n for n in names if n not in VALID_TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown LoRA targets {unknown or value!r}; choose from {', '.join(VALID_TARGETS)}"
        )
    return ",".join(names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file setting any flag below (kebab or snake case); the command line wins")
    _model_and_data_flags(p)
    _lora_flags(p.add_argument_group("LoRA"))
    _training_flags(p.add_argument_group("training"))
    _recipe_flags(p.add_argument_group("what the adapter keeps (labels, extra examples, augmentation)"))
    return p


def _recipe_flags(g) -> None:
    share, per_clip = number(float, 0, 1), number(float, 0)
    for flag, kind, what in (
        ("--timestamp-prob", share, "share of labels with timestamps <|0.00|> text <|end|>"),
        ("--prompt-prob", share, "share of labels after a previous-text prompt (same speaker/recording, else random)"),
        ("--no-speech-fraction", per_clip, "no-speech windows (silence, noise, hum) added per training clip"),
        (
            "--pack-fraction",
            per_clip,
            "30 s windows of joined training clips (a timestamped segment each; "
            "with --timestamp-prob, half end in a clip cut off at 30 s) per clip",
        ),
    ):
        g.add_argument(flag, type=kind, default=0.0, help=what)
    g.add_argument("--mix-data", help="another local dataset mixed into training (replay), e.g. English clips")
    g.add_argument(
        "--mix-fraction",
        type=number(float, 0, 1, low_open=True, high_open=True),
        default=0.1,
        help="share of the training examples drawn from --mix-data",
    )
    g.add_argument("--spec-augment", action="store_true", help="SpecAugment: mask mel bands and runs of frames")


def _model_and_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    utils.add_model_flags(g, "compute dtype of the base model (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument(
        "--adapter-path", default="adapters", help=f"folder for adapters, metrics and checkpoints {DEFAULTS_HELP}"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", help="local folder: metadata.csv / *.jsonl, with train/ validation/ test/ subfolders or one flat set"
    )
    g.add_argument("--hf-dataset", help="Hugging Face dataset name, e.g. mozilla-foundation/common_voice_17_0")
    g.add_argument("--hf-config", help="dataset config, e.g. te")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--test-split", default="test")
    g.add_argument(
        "--text-column", help="transcript column (default: sentence, text, transcription or normalized_text)"
    )
    g.add_argument("--audio-column", help="audio column of a Hub dataset (default: audio)")
    g.add_argument("--streaming", action="store_true", help="stream a large Hub dataset instead of downloading it")
    g.add_argument(
        "--num-workers",
        type=number(int, 0),
        default=min(4, os.cpu_count() or 1),
        help="threads that read and decode audio ahead of the training step; 0 = in the step (default: %(default)s)",
    )
    g.add_argument(
        "--feature-cache",
        help="folder keeping log-mel features (and frozen-encoder outputs) of each clip on disk, reused by later runs",
    )
    g.add_argument("--language", help="language of rows without a language/locale column, e.g. te")
    g.add_argument(
        "--val-fraction",
        type=number(float, 0, 1, high_open=True),
        default=0.1,
        help="validation share of a flat local set",
    )


def _lora_flags(g) -> None:
    g.add_argument(
        "--lora-layers",
        type=number(int, 1, also=(-1,)),
        default=-1,
        help="adapt the last N blocks of encoder and decoder; -1 = all",
    )
    g.add_argument("--lora-rank", type=number(int, 1), default=8)
    g.add_argument("--lora-alpha", type=number(float, 0, low_open=True), default=16.0, help="scale = alpha / rank")
    g.add_argument(
        "--lora-scale",
        type=number(float, 0, low_open=True),
        default=None,
        help="set the scale directly (overrides --lora-alpha)",
    )
    g.add_argument("--lora-dropout", type=number(float, 0, 1, high_open=True), default=0.0)
    g.add_argument(
        "--lora-targets",
        type=lora_targets,
        default="attn.query,attn.value,cross_attn.query,cross_attn.value",
        help="comma-separated layers per block: attn.{query,key,value,out}, cross_attn.*, mlp1, mlp2",
    )
    g.add_argument(
        "--freeze-encoder", action="store_true", help="no LoRA in the encoder; its outputs are computed once"
    )


def _training_flags(g) -> None:
    g.add_argument("--train", action="store_true", help="train (the default unless --test is given alone)")
    g.add_argument(
        "--test", action="store_true", help="evaluate on the test split (validation if none): WER/CER + predictions"
    )
    g.add_argument("--test-output", help="predictions JSONL of --test (default: ADAPTER_PATH/test_predictions.jsonl)")
    g.add_argument(
        "--no-report",
        action="store_true",
        help="with adapters, --test also scores the base model and writes test_report.md/.png; skip that",
    )
    g.add_argument("--iters", type=number(int, 1), default=200)
    g.add_argument(
        "--epochs",
        type=number(float, 0, low_open=True),
        default=None,
        help="train this many passes over the data (overrides --iters)",
    )
    g.add_argument("--batch-size", type=number(int, 1), default=8, help="clips per step (global, over all processes)")
    g.add_argument("--learning-rate", type=number(float, 0, low_open=True), default=1e-4)
    g.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--warmup", type=number(int, 0), default=0, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=number(float, 0), default=0.01)
    g.add_argument(
        "--grad-clip", type=number(float, 0), default=1.0, help="clip the gradient norm; 0 turns clipping off"
    )
    g.add_argument("--grad-accumulation", type=number(int, 1), default=1)
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--steps-per-report", type=number(int, 1), default=10)
    g.add_argument(
        "--steps-per-eval", type=number(int, 0), default=50, help="validation loss + greedy WER/CER; 0 = never"
    )
    g.add_argument(
        "--val-batches", type=number(int, 1, also=(-1,)), default=-1, help="validation batches per evaluation; -1 = all"
    )
    g.add_argument("--best-metric", choices=["cer", "wer", "loss"], default="cer")
    g.add_argument("--save-every", type=number(int, 1), default=100)
    g.add_argument("--resume", action="store_true", help="continue from ADAPTER_PATH/resume.safetensors")
    g.add_argument("--overwrite", action="store_true", help="replace adapters already in --adapter-path")
    g.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0)


def lora_config(args):
    from models.tuner.lora import LoRAConfig

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return LoRAConfig(
        num_layers=args.lora_layers,
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        scale=args.lora_scale,
        dropout=args.lora_dropout,
        targets=targets,
        freeze_encoder=args.freeze_encoder,
    )


def load_splits(args) -> Dict[str, object]:
    """{"train": [...], "validation": [...], "test": [...]} of Examples (or lazy streams)."""
    from models.tuner import datasets

    if (args.data is None) == (args.hf_dataset is None):
        raise ValueError("give exactly one of --data DIR or --hf-dataset NAME")
    if args.data is not None:
        # --test alone on a flat folder scores every row; training holds out --val-fraction.
        val_fraction = 0.0 if args.test and not args.train else args.val_fraction
        return datasets.load_local_dataset(
            args.data, val_fraction=val_fraction, seed=args.seed, text_column=args.text_column
        )
    wanted = {"train": args.train_split, "validation": args.val_split}
    if args.test:
        wanted["test"] = args.test_split
    return {
        name: datasets.load_hf_dataset(
            args.hf_dataset,
            args.hf_config,
            split,
            text_column=args.text_column,
            audio_column=args.audio_column,
            streaming=args.streaming,
        )
        for name, split in wanted.items()
        if split
    }


def featurize(examples, tokenizer, args, what: str, log, verbose: bool = True, language="") -> List:
    """The usable examples as Features that hold their audio, not their features (models/tuner/pipeline.py):
    transcripts are tokenized and audio headers read, with a progress bar; the drop report is logged."""
    from tqdm import tqdm

    from models.tuner.datasets import DropReport
    from models.tuner.pipeline import scan_examples

    language = args.language if language == "" else language
    report = DropReport()
    total = len(examples) if hasattr(examples, "__len__") else None
    progress = tqdm(examples, total=total, desc=f"Reading {what}", unit="clip", leave=False, disable=not verbose)
    features = list(scan_examples(progress, tokenizer, language, report, verbose=verbose))
    log(f"{what}: {report}")
    return features


def feature_loader(args, model, n_mels: int, encoder_cache: Optional[str], verbose: bool = True):
    """The loader of training and validation features: --num-workers, --feature-cache, a frozen encoder."""
    from models.tuner.pipeline import FeatureLoader

    encoder = model if args.freeze_encoder else None
    return FeatureLoader(
        n_mels, num_workers=args.num_workers, cache_dir=args.feature_cache, encoder=encoder,
        encoder_cache_dir=encoder_cache, verbose=verbose,
    )  # fmt: skip


def training_args(args, n_train: int, log):
    from models.tuner.trainer import TrainingArgs

    iters = args.iters
    if args.epochs is not None:
        if n_train == 0:
            raise ValueError("--epochs needs a non-streaming dataset; use --iters")
        per_epoch = math.ceil(n_train / (args.batch_size * args.grad_accumulation))
        iters = max(1, round(args.epochs * per_epoch))
        log(f"{args.epochs} epochs of {n_train} clips = {iters} iterations")
    return TrainingArgs(
        iters=iters,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None,
        grad_accumulation=args.grad_accumulation,
        grad_checkpoint=args.grad_checkpoint,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        val_batches=args.val_batches,
        save_every=args.save_every,
        seed=args.seed,
        best_metric=args.best_metric,
    )


def run_test(args, model, tokenizer, splits, log, adapters=None) -> int:
    """Score the test split (validation, or the flat set, when there is none) and write predictions.

    With `adapters` (the folder they came from), the base model scores the same clips too, and a
    before/after report (Markdown and a per-clip CER plot) is written beside the predictions.
    """
    from models.atomic import atomic_output
    from models.tuner.evaluate import evaluate
    from models.tuner.trainer import loss_fn

    name = next((n for n in ("test", "validation", "train") if splits.get(n)), None)
    if name is None:
        raise ValueError("--test found no examples (no test, validation or flat set)")
    features = featurize(splits[name], tokenizer, args, name, log)
    loader = feature_loader(args, None, model.dims.n_mels, None)
    result = evaluate(model, tokenizer, features, args.batch_size, loss_fn, loader=loader)
    output = predictions_path(args)
    adapted = {"summary": result_summary(name, features, result), "predictions": result.predictions}
    with atomic_output(output, "w", encoding="utf-8") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
        f.write(json.dumps(adapted["summary"]) + "\n")
    log(f"Test on {name} ({len(features)} clips): {result.summary()}; predictions in {output}")
    if adapters is not None and not args.no_report:
        before_after_report(args, model, tokenizer, features, adapted, adapters, log, loader)
    loader.close()
    return 0


def predictions_path(args) -> Path:
    from models.tuner.adapters import AdapterFolder

    return Path(args.test_output) if args.test_output else AdapterFolder(args.adapter_path).predictions


def report_paths(predictions: Path) -> tuple:
    """The before/after report beside a predictions file: (Markdown, PNG)."""
    from models.tuner.adapters import PREDICTIONS_FILE, REPORT_FILE, REPORT_PLOT

    if predictions.name == PREDICTIONS_FILE:
        return predictions.with_name(REPORT_FILE), predictions.with_name(REPORT_PLOT)
    return predictions.with_suffix(".md"), predictions.with_suffix(".png")


def result_summary(split: str, features, result) -> dict:
    rates = {"wer": result.wer, "cer": result.cer, "wer_orthographic": result.wer_orthographic,
             "cer_orthographic": result.cer_orthographic}  # fmt: skip
    return {"split": split, "clips": len(features), "loss": result.loss, **rates}


def before_after_report(args, model, tokenizer, features, adapted: dict, adapters, log, loader) -> None:
    """The base model on the same clips, and the report of both."""
    from models.loading import load_model
    from models.tuner.evaluate import evaluate
    from models.tuner.report import write_test_report
    from models.tuner.trainer import loss_fn

    base_model = load_model(args.model, dtype=model.dtype)
    result = evaluate(base_model, tokenizer, features, args.batch_size, loss_fn, loader=loader)
    base = {"summary": result_summary(adapted["summary"]["split"], features, result), "predictions": result.predictions}
    markdown, png = report_paths(predictions_path(args))
    title = f"{Path(args.model).name} + {adapters}: {adapted['summary']['split']} of {args.data or args.hf_dataset}"
    write_test_report(base, adapted, markdown, png, title)
    log(f"Base model on the same clips: {result.summary()}; before/after report in {markdown}")


def streamed_batches(args, splits, tokenizer, loader, world):
    """batch_source for a streamed Hub dataset: its batches from micro-batch `start` on (the ones
    before it are scanned, not decoded)."""
    from models.tuner.batches import stream_batches

    rank, size = (0, 1) if world is None else (world.rank(), world.size())
    return lambda start: stream_batches(
        splits["train"], tokenizer, loader.n_mels, args.language, args.batch_size, rank=rank, world_size=size,
        start_batch=start, loader=loader,
    )  # fmt: skip


RECIPE_FLAGS = (
    "timestamp_prob", "prompt_prob", "no_speech_fraction", "pack_fraction", "mix_data", "mix_fraction", "spec_augment"
)  # fmt: skip


def recipe(args) -> dict:
    """The flags that shape the training examples, as adapter_config.json records them."""
    return {name: getattr(args, name) for name in RECIPE_FLAGS}


def check_recipe(args) -> None:
    """Flags that shape training examples, refused where they cannot work (before any loading)."""
    drawn = [f"--{n.replace('_', '-')}" for n in RECIPE_FLAGS if n != "mix_fraction" and getattr(args, n)]
    if drawn and args.streaming:
        raise ValueError(f"{', '.join(drawn)} cannot be combined with --streaming yet; download the dataset instead")
    if args.spec_augment and args.freeze_encoder:
        raise ValueError("--spec-augment masks the mel features, which --freeze-encoder encodes once; drop one")
    if args.mix_data is not None and not Path(args.mix_data).exists():
        raise ValueError(f"--mix-data {args.mix_data} does not exist; pass a local dataset folder")


def extra_examples(args, train_set, tokenizer, log, verbose: bool) -> List:
    """Packed windows of training clips, replay examples from --mix-data and no-speech windows."""
    from models.tuner.datasets import load_local_dataset
    from models.tuner.extras import mixed_in, no_speech_examples, packed_examples
    from models.tuner.labels import unfinished

    extra, n_train = [], len(train_set)
    if args.pack_fraction > 0:
        count = max(1, round(args.pack_fraction * n_train))
        # Half the windows end in a clip cut off at 30 s (an unfinished segment), which only
        # timestamped labels can say.
        tails = PACK_TAIL_PROB if args.timestamp_prob > 0 else 0.0
        extra += packed_examples(train_set, tokenizer, count, args.seed, tail_prob=tails)
        cut = sum(unfinished(tokenizer, f.timed) for f in extra)
        log(f"Packed windows: {len(extra)} of joined training clips, {cut} ending in a clip cut off at 30 s")
    if args.mix_data is not None:
        splits = load_local_dataset(args.mix_data, val_fraction=0.0, text_column=args.text_column)
        pool = featurize(splits["train"], tokenizer, args, "--mix-data", log, verbose, language=None)
        if not pool:
            raise ValueError(f"--mix-data {args.mix_data}: no usable examples (rows need a language column)")
        count = round(args.mix_fraction / (1 - args.mix_fraction) * n_train)
        extra += mixed_in(pool, count, args.seed)
        log(f"--mix-data: {count} of {len(pool)} clips mixed in ({100 * args.mix_fraction:.0f}% of training)")
    if args.no_speech_fraction > 0:
        count = max(1, round(args.no_speech_fraction * n_train))
        extra += no_speech_examples(tokenizer, count, args.seed)
        log(f"No-speech windows: {count} (silence, noise, hum) labelled <|nospeech|>")
    return extra


def check_outputs(args, training: bool) -> None:
    """Before any work: no output may overwrite an input, and an adapter folder holds only lora.py's files."""
    from models.outputs import OutputPathError, check_not_an_input, check_replaceable
    from models.tuner.adapters import FILES_WRITTEN

    inputs = {"--model": args.model, "--data": args.data, "--mix-data": args.mix_data}
    if training:
        check_not_an_input("--adapter-path", args.adapter_path, inputs)
        check_replaceable("--adapter-path", args.adapter_path, FILES_WRITTEN, "lora.py")
    if args.test_output is not None:
        check_not_an_input("--test-output", args.test_output, {**inputs, "--adapter-path": args.adapter_path})
        check_predictions_file(Path(args.test_output))
        for path in report_paths(Path(args.test_output)):
            check_not_an_input("--test-output", path, {**inputs, "--adapter-path": args.adapter_path})
            if path.exists() and not Path(args.test_output).exists():
                raise OutputPathError(
                    f"--test-output {args.test_output} would write its report over {path}, which lora.py did not "
                    f"write; it is left as it is: choose another --test-output"
                )


def check_predictions_file(path: Path) -> None:
    """--test-output may replace an earlier predictions file of lora.py --test, and nothing else."""
    from models.outputs import OutputPathError

    if not path.exists():
        return
    try:
        last = path.read_text(encoding="utf-8").splitlines()[-1]
        ours = path.is_file() and {"split", "clips", "wer", "cer"} <= set(json.loads(last))
    except (OSError, UnicodeDecodeError, IndexError, ValueError, TypeError):
        ours = False
    if not ours:
        raise OutputPathError(
            f"--test-output {path} exists and is not a predictions file of lora.py --test; it is "
            f"left as it is: choose another --test-output"
        )


def check_resume(folder, identity: dict) -> None:
    """--resume continues only a run of the same model and LoRA settings; the differences are named."""
    from models.tuner.adapters import read_adapter_config, resume_mismatch

    if not folder.has_config():
        raise ValueError(f"--resume: {folder.path} holds no adapter_config.json; train without --resume first")
    saved = read_adapter_config(folder.path)
    saved.setdefault("recipe", recipe(build_parser().parse_args([])))  # written before these flags existed
    differences = resume_mismatch(saved, identity)
    if differences:
        raise ValueError(
            f"--resume: {folder.path} was trained with other settings ({'; '.join(differences)}); "
            f"resume with the same flags, or start again with --overwrite"
        )


def train(args, model, tokenizer, splits, world, log) -> int:
    from models.tuner.adapters import AdapterFolder

    folder = AdapterFolder(args.adapter_path)
    if folder.has_adapters() and not (args.resume or args.overwrite):
        raise ValueError(
            f"{folder.path} already holds adapters; pass --resume to continue that run, "
            f"--overwrite to replace them, or another --adapter-path"
        )
    if world is not None and world.rank() > 0:
        return train_in(folder, args, model, tokenizer, splits, world, log)
    with folder.locked():  # one run per adapter folder; rank 0 speaks for the group
        return train_in(folder, args, model, tokenizer, splits, world, log)


def train_in(folder, args, model, tokenizer, splits, world, log) -> int:
    from models.tuner.lora import linear_to_lora_layers, parameter_count, trainable_parameter_count

    rank = 0 if world is None else world.rank()
    config = lora_config(args)
    identity = {
        "base_model": str(args.model),
        "model_dims": model.dims.to_dict(),
        "lora": config.to_dict(),
        "recipe": recipe(args),  # the drawn labels and extra examples: a resumed run must draw the same
    }
    if args.resume:
        check_resume(folder, identity)
    linear_to_lora_layers(model, config)
    trainable, total = trainable_parameter_count(model), parameter_count(model)
    log(f"Trainable parameters: {trainable / 1e6:.3f}M of {total / 1e6:.1f}M ({100 * trainable / total:.2f}%)")
    streaming = args.streaming and args.hf_dataset is not None
    tic = time.perf_counter()
    val = featurize(splits.get("validation", []), tokenizer, args, "validation", log, rank == 0)
    train_set = [] if streaming else featurize(splits["train"], tokenizer, args, "train", log, rank == 0)
    if not streaming and not train_set:
        raise ValueError("no usable training examples (see the report above)")
    train_set = train_set + extra_examples(args, train_set, tokenizer, log, rank == 0)
    log(f"Examples ready in {time.perf_counter() - tic:.1f} s")
    with encoder_cache_folder(args) as encoder_cache:
        loader = feature_loader(args, model, model.dims.n_mels, encoder_cache, verbose=rank == 0)
        try:
            return train_with(folder, args, model, tokenizer, splits, world, log, identity, train_set, val, loader)
        finally:
            loader.close()


def encoder_cache_folder(args):
    """Where frozen-encoder outputs are kept: --feature-cache, else a temporary folder removed after the run."""
    import contextlib
    import tempfile

    if not args.freeze_encoder or args.feature_cache is not None:
        return contextlib.nullcontext(args.feature_cache)
    return tempfile.TemporaryDirectory(prefix="whisper-lora-encoder-")


def train_with(folder, args, model, tokenizer, splits, world, log, identity, train_set, val, loader) -> int:
    from models.tuner.augment import SpecAugment
    from models.tuner.labels import Labeler
    from models.tuner.trainer import Trainer, TrainingStopped
    from models.tuner.trainer import train as train_loop

    rank = 0 if world is None else world.rank()
    streaming = args.streaming and args.hf_dataset is not None
    training = training_args(args, len(train_set), log)
    folder.config = {
        "version": CONFIG_VERSION,
        **identity,
        "training": asdict(training),
        "data": args.data or f"{args.hf_dataset}:{args.hf_config}",
        "language": args.language,
    }
    trainer = Trainer(model, tokenizer, training, world=world, log=log)
    source = streamed_batches(args, splits, tokenizer, loader, world) if streaming else None
    labeler = Labeler(tokenizer, train_set, args.timestamp_prob, args.prompt_prob)
    augment = SpecAugment(n_mels=model.dims.n_mels) if args.spec_augment else None
    try:
        final = train_loop(
            trainer, train_set, val, folder, resume=args.resume, batch_source=source, labeler=labeler,
            spec_augment=augment, loader=loader,
        )  # fmt: skip
    except TrainingStopped as stop:
        log(str(stop))
        return 1
    if loader.dropped:
        log(f"Found when decoded: {loader.report}")
    if loader.cache_stats():
        log(f"Feature cache: {loader.cache_stats()}")
    log(f"Saved adapters to {folder.path}; final validation: {json.dumps(final)}")
    if args.test and rank == 0:  # test predictions are not sharded: rank 0 scores them alone
        return run_test(args, model, tokenizer, splits, log, adapters=folder.path)
    return 0


def run(args) -> int:
    import mlx.core as mx

    from models.backend import compute_dtype
    from models.loading import load_model
    from models.tokenizer import tokenizer_for
    from models.tuner.adapters import AdapterFolder, load_adapters
    from models.tuner.distributed import init_distributed

    training = args.train or not args.test
    check_outputs(args, training)
    check_recipe(args)
    world = init_distributed()
    rank = 0 if world is None else world.rank()
    log = print if rank == 0 else (lambda *a, **k: None)
    mx.random.seed(args.seed)
    tic = time.perf_counter()
    model = load_model(args.model, dtype=compute_dtype(args.dtype, training=True))
    log(f"Loaded {args.model} in {time.perf_counter() - tic:.1f} s")
    tokenizer = tokenizer_for(model, language=args.language or "en")
    splits = load_splits(args)
    if training:
        return train(args, model, tokenizer, splits, world, log)
    folder = AdapterFolder(args.adapter_path)  # --test alone: base model, or base + the folder's adapters
    adapters = None
    if folder.has_config():
        load_adapters(model, folder.path)
        adapters = folder.path
        log(f"Loaded adapters from {folder.path}")
    return run_test(args, model, tokenizer, splits, log, adapters) if rank == 0 else 0


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the flags of a --config YAML file first (the command line wins)."""
    return utils.parse_with_config(build_parser(), argv)


def main(argv=None) -> int:
    utils.start_cli()
    args = parse_args(argv)
    from models.backend import limit_cuda_queue_memory
    from models.tuner.adapters import AdapterFolderBusy
    from models.tuner.datasets import DatasetLoadError
    from models.tuner.distributed import DistributedError

    limit_cuda_queue_memory()
    # Ctrl-C in training is handled by the loop (it saves and stops); this covers loading and preparing.
    expected = (ValueError, OSError, DatasetLoadError, DistributedError, AdapterFolderBusy)
    return utils.report_errors(lambda: run(args), expected, interrupted="stopped before training; nothing was saved")


if __name__ == "__main__":
    sys.exit(main())
