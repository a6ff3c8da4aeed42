"""Glue behind lora.py: load the model and data, then train adapters or evaluate (--test)."""

import json
import math
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from . import data as D
from .lora import LoRAConfig, linear_to_lora_layers, parameter_count, trainable_parameter_count
from .tokenizer import get_tokenizer
from .trainer import Trainer, TrainingArgs, TrainingStopped, train

VERSION = 1


def default_dtype(name: Optional[str]) -> mx.Dtype:
    if name is not None:
        return getattr(mx, name)
    gpu = mx.default_device() == mx.gpu
    return mx.bfloat16 if gpu else mx.float32


def lora_config_from_args(args) -> LoRAConfig:
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return LoRAConfig(num_layers=args.lora_layers, rank=args.lora_rank, alpha=args.lora_alpha,
                      scale=args.lora_scale, dropout=args.lora_dropout, targets=targets,
                      freeze_encoder=args.freeze_encoder)


def load_splits(args, world=None) -> Dict[str, object]:
    """{"train": [...], "validation": [...], "test": [...]} of Examples (or lazy streams)."""
    if (args.data is None) == (args.hf_dataset is None):
        raise SystemExit("error: give exactly one of --data DIR or --hf-dataset NAME")
    if args.data is not None:
        # --test alone on a flat folder scores every row; training holds out --val-fraction.
        val_fraction = 0.0 if args.test and not args.train else args.val_fraction
        return D.load_local_dataset(args.data, val_fraction=val_fraction, seed=args.seed,
                                    text_column=args.text_column)
    splits = {}
    wanted = {"train": args.train_split, "validation": args.val_split}
    if args.test:
        wanted["test"] = args.test_split
    for name, split in wanted.items():
        if split:
            splits[name] = D.load_hf_dataset(args.hf_dataset, args.hf_config, split, text_column=args.text_column,
                                             audio_column=args.audio_column, streaming=args.streaming)
    return splits


def featurize(examples, tokenizer, n_mels, language, what: str, log, verbose: bool = True) -> List[D.Features]:
    features, report = D.prepare_examples(examples, tokenizer, n_mels, language, verbose=verbose)
    log(f"{what}: {report}")
    return features


def cache_encoder_outputs(model, features: List[D.Features], batch_size: int) -> List[D.Features]:
    """Frozen encoder: replace each clip's mel by its encoder output, computed once."""
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        mel = mx.array(np.stack([f.mel for f in chunk])).astype(model.decoder.ln.weight.dtype)
        encoded = np.array(model.embed_audio(mel).astype(mx.float16))
        out += [D.Features(e, f.labels, f.source) for e, f in zip(encoded, chunk)]
    return out


def run(args) -> int:
    from utils import load_adapters, load_model, save_adapters

    world = init_distributed()
    rank = 0 if world is None else world.rank()
    log = print if rank == 0 else (lambda *a, **k: None)
    mx.random.seed(args.seed)
    dtype = default_dtype(args.dtype)
    model = load_model(args.model, dtype=dtype)
    tokenizer = get_tokenizer(model.is_multilingual, model.num_languages, language=args.language or "en",
                              task="transcribe")
    splits = load_splits(args)
    adapter_path = Path(args.adapter_path)
    do_train = args.train or not args.test
    if not do_train:  # --test alone: base model, or base + adapters when the folder has them
        if (adapter_path / "adapter_config.json").is_file():
            load_adapters(model, adapter_path)
            log(f"Loaded adapters from {adapter_path}")
        return run_test(args, model, tokenizer, splits, log) if rank == 0 else 0
    if (adapter_path / "adapters.safetensors").exists() and not (args.resume or args.overwrite):
        raise SystemExit(f"error: {adapter_path} already holds adapters; pass --resume to continue that run, "
                         f"--overwrite to replace them, or another --adapter-path")
    lora_config = lora_config_from_args(args)
    linear_to_lora_layers(model, lora_config)
    log(f"Trainable parameters: {trainable_parameter_count(model) / 1e6:.3f}M of "
        f"{parameter_count(model) / 1e6:.1f}M ({100 * trainable_parameter_count(model) / parameter_count(model):.2f}%)")
    n_mels = model.dims.n_mels
    val = featurize(splits.get("validation", []), tokenizer, n_mels, args.language, "validation", log, rank == 0)
    streaming = args.streaming and args.hf_dataset is not None
    train_set = [] if streaming else featurize(splits["train"], tokenizer, n_mels, args.language, "train", log,
                                               rank == 0)
    if not streaming and not train_set:
        raise SystemExit("error: no usable training examples (see the report above)")
    if lora_config.freeze_encoder:
        log("Frozen encoder: computing encoder outputs once")
        train_set = cache_encoder_outputs(model, train_set, args.batch_size)
        val = cache_encoder_outputs(model, val, args.batch_size)
    training = training_args(args, len(train_set), log)
    config = {"version": VERSION, "base_model": str(args.model), "model_dims": model.dims.to_dict(),
              "lora": lora_config.to_dict(), "training": asdict(training),
              "data": args.data or f"{args.hf_dataset}:{args.hf_config}", "language": args.language}
    trainer = Trainer(model, tokenizer, training, world=world, log=log)

    def save(folder: Path, weights_name: str) -> None:
        save_adapters(model, folder, config, weights_name)

    source = None
    if streaming:
        source = lambda start: enumerate(islice(D.stream_batches(  # noqa: E731
            splits["train"], tokenizer, n_mels, args.language, args.batch_size, rank=rank,
            world_size=1 if world is None else world.size()), start, None), start)
    try:
        final = train(trainer, train_set, val, save, resume=args.resume, batch_source=source)
    except TrainingStopped as stop:
        log(str(stop))
        return 1
    if rank == 0:
        log(f"Saved adapters to {adapter_path}; final validation: {json.dumps(final)}")
    if args.test and rank == 0:  # test predictions are not sharded: rank 0 scores them alone
        return run_test(args, model, tokenizer, splits, log)
    return 0


def training_args(args, n_train: int, log) -> TrainingArgs:
    iters = args.iters
    if args.epochs is not None:
        if n_train == 0:
            raise SystemExit("error: --epochs needs a non-streaming dataset; use --iters")
        per_epoch = math.ceil(n_train / (args.batch_size * args.grad_accumulation))
        iters = max(1, round(args.epochs * per_epoch))
        log(f"{args.epochs} epochs of {n_train} clips = {iters} iterations")
    return TrainingArgs(
        adapter_path=args.adapter_path, iters=iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None, grad_accumulation=args.grad_accumulation,
        grad_checkpoint=args.grad_checkpoint, steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval, val_batches=args.val_batches, save_every=args.save_every,
        seed=args.seed, best_metric=args.best_metric,
    )


def run_test(args, model, tokenizer, splits, log) -> int:
    from utils import atomic_output
    from .evaluate import evaluate
    from .trainer import loss_fn

    name = next((n for n in ("test", "validation", "train") if splits.get(n)), None)
    if name is None:
        raise SystemExit("error: --test found no examples (no test, validation or flat set)")
    features = featurize(splits[name], tokenizer, model.dims.n_mels, args.language, name, log)
    result = evaluate(model, tokenizer, features, args.batch_size, loss_fn)
    output = Path(args.test_output or Path(args.adapter_path) / "test_predictions.jsonl")
    with atomic_output(output, "w", encoding="utf-8") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
        f.write(json.dumps({"split": name, "clips": len(features), "loss": result.loss, "wer": result.wer,
                            "cer": result.cer}) + "\n")
    log(f"Test on {name} ({len(features)} clips): {result.summary()}; predictions in {output}")
    return 0


def _launched_distributed() -> bool:
    import os

    # mlx.launch sets MLX_RANK for every backend (ring, nccl, jaccl); mpirun sets OMPI_COMM_WORLD_RANK.
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR"))


def init_distributed() -> Optional[mx.distributed.Group]:
    """The process group when started by mlx.launch or mpirun, else None (one process)."""
    import os

    if not _launched_distributed():
        return None
    world = mx.distributed.init()
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if world.size() == 1 and rank > 0:  # init() falls back to one process when no backend starts
        raise SystemExit(f"error: launched as rank {rank}, but no distributed backend could start; "
                         f"check the hosts, ports and --backend given to mlx.launch")
    return world
