"""Language detection accuracy per language on the validation clips in ../shared/data.

    python benchmarks/language_detection.py --model ../shared/models/whisper-base-mlx te yo sw

Prints one row per language: clips, top-1 accuracy, the true language's mean probability,
its mean rank among all languages, and what the model guessed instead.
"""

import argparse
import csv
import sys
import time
from collections import Counter

import numpy as np

from common import SHARED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("languages", nargs="*", default=["te", "yo", "sw"], help="folders under ../shared/data")
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base-mlx"))
    p.add_argument("--adapter-path", default=None, help="LoRA adapters to apply first")
    p.add_argument("--split", default="validation")
    p.add_argument("--batch-size", type=int, default=4)
    return p


def clips(language: str, split: str):
    folder = SHARED / "data" / language / split
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        return [(folder / row["file_name"], row.get("language") or language) for row in csv.DictReader(f)]


def detect(model, paths, batch_size: int):
    """{code: probability} of each clip's first 30 s window."""
    import mlx.core as mx

    from models.audio import ArraySource, MelWindows, load_audio
    from models.inference.decoding import detect_language

    probs = []
    for first in range(0, len(paths), batch_size):
        mels = [
            MelWindows(ArraySource(load_audio(p)), model.dims.n_mels).window(0)
            for p in paths[first : first + batch_size]
        ]
        probs += detect_language(model, mx.array(np.stack(mels)))[1]
    return probs


def main() -> int:
    args = build_parser().parse_args()
    from models.backend import ensure_fast_blas

    ensure_fast_blas()
    import transcribe as cli

    model = cli.load(args.model, args.adapter_path, "float32")
    print(f"model: {args.model}" + (f" + {args.adapter_path}" if args.adapter_path else ""))
    print(f"{'language':<9}{'clips':>6}{'accuracy':>10}{'p(true)':>9}{'rank':>6}  detected instead")
    for language in args.languages:
        tic = time.perf_counter()
        items = clips(language, args.split)
        probs = detect(model, [path for path, _ in items], args.batch_size)
        truth = [code for _, code in items]
        guesses = [max(p, key=p.get) for p in probs]
        accuracy = np.mean([g == t for g, t in zip(guesses, truth)])
        p_true = np.mean([p[t] for p, t in zip(probs, truth)])
        rank = np.mean([sorted(p.values(), reverse=True).index(p[t]) + 1 for p, t in zip(probs, truth)])
        wrong = Counter(g for g, t in zip(guesses, truth) if g != t).most_common(4)
        others = ", ".join(f"{code} x{n}" for code, n in wrong) or "-"
        print(
            f"{language:<9}{len(items):>6}{accuracy:>10.1%}{p_true:>9.3f}{rank:>6.1f}  {others}"
            f"   ({time.perf_counter() - tic:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
