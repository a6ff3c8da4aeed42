"""WER and size of a fused model in float16, 8-bit and 4-bit (fuse.py --quantize) on a speech folder.

    python benchmarks/quantized_wer.py --model ../shared/models/whisper-base-mlx \\
        --adapter-path runs/s5/best --data ../shared/data/en-read --language en --work /tmp/qwer

Each variant is written by `models.export.fuse.run` (the code behind fuse.py), loaded back with
models.loading.load_model and transcribed greedily without timestamps (transcribe_batch), as the
real-model tests do. `base` is the base model without adapters, for reference.
Quantized matmuls of mlx 0.32 on the CPU are 10-30x slower than float ones: run this on a
GPU, or pass --dequantized on the CPU to compute with the quantized weights dequantized
(the same values, a float kernel). Prints one JSON object (also written to --output).
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

import common  # noqa: F401 (puts the repository on sys.path)
from models.export.fuse import FuseConfig, quantization_of, run
from models.inference.decoding import DecodingOptions
from models.inference.transcribe import transcribe_batch
from models.loading import load_model
from models.tuner.lora import dequantize_model
from models.tuner.metrics import cer, wer

VARIANTS = {"float16": {}, "q8": {"quantize": True, "q_bits": 8}, "q4": {"quantize": True, "q_bits": 4}}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def evaluate(model, rows, data: Path, language: str, batch_size: int) -> dict:
    tic = time.time()
    results = transcribe_batch(
        model,
        [str(data / r["file_name"]) for r in rows],
        DecodingOptions(language=language, without_timestamps=True),
        batch_size,
    )
    hyps, refs = [r["text"] for r in results], [r["transcription"] for r in rows]
    return {"wer": wer(refs, hyps), "cer": cer(refs, hyps), "seconds": round(time.time() - tic, 1), "hyps": hyps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-path", required=True)
    p.add_argument("--data", required=True, help="audiofolder with metadata.csv")
    p.add_argument("--language", default="en")
    p.add_argument("--work", default="/tmp/quantized_wer", help="where the fused folders are written")
    p.add_argument("--variants", default="base,float16,q8,q4")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="first N clips only (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default=None,
        help="compute dtype (default: float16 on a GPU, float32 on the CPU)",
    )
    p.add_argument("--dequantized", action="store_true", help="compute with dequantized weights (CPU)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    dtype = getattr(mx, args.dtype or ("float16" if mx.default_device() == mx.gpu else "float32"))
    data, work = Path(args.data), Path(args.work)
    with open(data / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file_name"])[: args.limit]
    report = {
        "device": str(mx.default_device()),
        "dtype": str(dtype),
        "clips": len(rows),
        "dequantized": args.dequantized,
        "variants": {},
    }
    for name in args.variants.split(","):
        if name == "base":
            model, size = load_model(args.model, dtype), None
        else:
            folder = work / name
            run(
                FuseConfig(
                    args.model,
                    args.adapter_path,
                    str(folder),
                    force=True,
                    q_group_size=args.q_group_size,
                    **VARIANTS[name],
                ),
                log=lambda *_: None,
            )
            model, size = load_model(str(folder), dtype), folder_size(folder)
            if args.dequantized and quantization_of(model) is not None:
                dequantize_model(model)
        result = {"size_bytes": size, **evaluate(model, rows, data, args.language, args.batch_size)}
        report["variants"][name] = result
        print(
            f"{name}: WER {100 * result['wer']:.2f}%, CER {100 * result['cer']:.2f}%, "
            f"size {size and round(size / 2**20, 1)} MiB, {result['seconds']} s",
            flush=True,
        )
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.output is not None:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    print(json.dumps({k: {m: v for m, v in r.items() if m != "hyps"} for k, r in report["variants"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
