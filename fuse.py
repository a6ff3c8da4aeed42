"""Merge LoRA adapters into a Whisper model: a standalone folder that any Whisper runtime loads.

    python fuse.py --model ../shared/models/whisper-base-mlx --adapter-path adapters/te \\
        --save-path whisper-base-te [--quantize --q-bits 8] [--export-hf whisper-base-te-hf] \\
        [--upload-repo USER/whisper-base-te]

--save-path gets an MLX community folder (config.json, weights.safetensors, README.md) that
transcribe.py and mlx_whisper read; --export-hf a transformers folder (model, generation and
tokenizer files) that WhisperForConditionalGeneration and CTranslate2's converter read.
"""

import argparse
import sys
import warnings

import utils


def build_parser() -> argparse.ArgumentParser:
    from models.export.fuse import Q_BITS, Q_GROUP_SIZES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_model_flags(p, "weight dtype (default: the base model's)", model_required=True)
    p.add_argument("--adapter-path", required=True, help="folder with adapters.safetensors + adapter_config.json")
    p.add_argument("--save-path", default="fused_model", help="MLX output folder (default: %(default)s)")
    p.add_argument("--quantize", action="store_true", help="quantize Linear and Embedding layers (MLX folder only)")
    p.add_argument("--q-bits", type=int, choices=Q_BITS, default=4, help="bits per weight (default: %(default)s)")
    p.add_argument(
        "--q-group-size",
        type=int,
        choices=Q_GROUP_SIZES,
        default=64,
        help="weights sharing one scale (default: %(default)s)",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="write float weights when the base model is quantized (adapters trained with QLoRA)",
    )
    p.add_argument(
        "--export-hf",
        default=None,
        metavar="FOLDER",
        help="also write the Hugging Face transformers layout (float weights) to FOLDER",
    )
    p.add_argument(
        "--upload-repo",
        default=None,
        metavar="USER/NAME",
        help="create this Hub model repo (if needed) and upload the --save-path folder to it",
    )
    p.add_argument("--force", action="store_true", help="replace output folders that already exist")
    return p


def main(argv=None) -> int:
    utils.start_cli()
    args = build_parser().parse_args(argv)
    from models.export.fuse import FuseConfig, run

    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    return utils.report_errors(lambda: run(FuseConfig(**vars(args))) or 0)


if __name__ == "__main__":
    sys.exit(main())
