"""Fine-tune Whisper with LoRA adapters on audio + transcript pairs, or evaluate a model (--test).

Example (Telugu, local folders with train/ and validation/):
    python lora.py --model ../shared/models/whisper-base-mlx --data ../shared/data/te \\
        --language te --adapter-path adapters/te --iters 300
"""

import argparse
import json
import sys
from dataclasses import fields
from itertools import islice
from pathlib import Path

DEFAULTS_HELP = "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file setting any flag below (kebab or snake case); the command line wins")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mlx-community/whisper-tiny", help=f"base model folder or Hub repo {DEFAULTS_HELP}")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype of the base model (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--adapter-path", default="adapters", help=f"folder for adapters, metrics and checkpoints {DEFAULTS_HELP}")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="local folder: metadata.csv / *.jsonl, with train/ validation/ test/ subfolders or one flat set")
    g.add_argument("--hf-dataset", help="Hugging Face dataset name, e.g. mozilla-foundation/common_voice_17_0")
    g.add_argument("--hf-config", help="dataset config, e.g. te")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--test-split", default="test")
    g.add_argument("--text-column", help="transcript column (default: sentence, text, transcription or normalized_text)")
    g.add_argument("--audio-column", help="audio column of a Hub dataset (default: audio)")
    g.add_argument("--streaming", action="store_true", help="stream a large Hub dataset instead of downloading it")
    g.add_argument("--language", help="language of rows without a language/locale column, e.g. te")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation share of a flat local set")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-layers", type=int, default=-1, help="adapt the last N blocks of encoder and decoder; -1 = all")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scale = alpha / rank")
    g.add_argument("--lora-scale", type=float, default=None, help="set the scale directly (overrides --lora-alpha)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="attn.query,attn.value,cross_attn.query,cross_attn.value",
                   help="comma-separated layers per block: attn.{query,key,value,out}, cross_attn.*, mlp1, mlp2")
    g.add_argument("--freeze-encoder", action="store_true", help="no LoRA in the encoder; its outputs are computed once")
    g = p.add_argument_group("training")
    g.add_argument("--train", action="store_true", help="train (the default unless --test is given alone)")
    g.add_argument("--test", action="store_true", help="evaluate on the test split (validation if none): WER/CER + predictions")
    g.add_argument("--test-output", help="predictions JSONL of --test (default: ADAPTER_PATH/test_predictions.jsonl)")
    g.add_argument("--iters", type=int, default=200)
    g.add_argument("--epochs", type=float, default=None, help="train this many passes over the data (overrides --iters)")
    g.add_argument("--batch-size", type=int, default=8, help="clips per step (global, over all processes)")
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm; 0 turns clipping off")
    g.add_argument("--grad-accumulation", type=int, default=1)
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--steps-per-report", type=int, default=10)
    g.add_argument("--steps-per-eval", type=int, default=50, help="validation loss + greedy WER/CER; 0 = never")
    g.add_argument("--val-batches", type=int, default=-1, help="validation batches per evaluation; -1 = all")
    g.add_argument("--best-metric", choices=["cer", "wer", "loss"], default="cer")
    g.add_argument("--save-every", type=int, default=100)
    g.add_argument("--resume", action="store_true", help="continue from ADAPTER_PATH/resume.safetensors")
    g.add_argument("--overwrite", action="store_true", help="replace adapters already in --adapter-path")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        apply_config_file(parser, args.config)
        args = parser.parse_args(argv)  # defaults now come from the file; given flags still win
    return args


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: could not read it ({error})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag: value")
    known = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            parser.error(f"--config {path}: unknown setting {key!r}")
        defaults[dest] = ",".join(value) if dest == "lora_targets" and isinstance(value, list) else value
    parser.set_defaults(**defaults)


def main(argv=None) -> int:
    from models.blas import ensure_fast_blas

    ensure_fast_blas()
    args = parse_args(argv)
    from models.data import DatasetLoadError
    from models.finetune import run
    from models.trainer import limit_cuda_queue_memory

    limit_cuda_queue_memory()

    try:
        return run(args)
    except (ValueError, OSError, DatasetLoadError) as error:  # bad input: the message says what to fix
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
