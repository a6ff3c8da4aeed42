"""Silence and noise must give no words, with the base model and with every adapter.

    python benchmarks/no_speech_check.py --model ../shared/models/whisper-base-mlx \
        --adapter-path te=adapters/te/best,yo=adapters/yo/best

Each model transcribes, with the default settings, 30 s of digital silence, of silence with
dither below -80 dBFS, and of white noise at -20 dBFS, with its language forced and detected.
Prints one line per case and a JSON summary; exits 1 when any case produced text. --out keeps,
per case, the language decoded and each segment's temperature, average log-probability, no-speech
probability and compression ratio (what transcription's no-speech and fallback rules looked at).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the repository on the path)
from models.audio import SAMPLE_RATE
from models.backend import compute_dtype
from models.inference.routing import parse_adapter_routes, with_adapters
from models.inference.transcribe import transcribe
from models.loading import load_model

# kept per segment, so a case that gave text shows why no guard dropped it
SEGMENT_KEYS = ("start", "end", "text", "temperature", "avg_logprob", "no_speech_prob", "compression_ratio")


def cases() -> dict:
    silence = np.zeros(30 * SAMPLE_RATE, np.float32)
    noise = (0.1 * np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE)).astype(np.float32)
    return {"digital silence": silence, "dither (-90 dBFS)": silence + 3e-5, "white noise (-20 dBFS)": noise}


def check(model, language) -> list:
    """[{case, language, text}] of every case, with `language` forced and then detected."""
    found = []
    for name, audio in cases().items():
        for forced in dict.fromkeys([language, None]):
            result = transcribe(model, audio, language=forced)
            segments = [{k: s[k] for k in SEGMENT_KEYS if k in s} for s in result["segments"]]
            found.append({"case": name, "language": forced or "detected", "text": result["text"],
                          "decoded_language": result.get("language"), "segments": segments})  # fmt: skip
    return found


def _verdict(row: dict) -> str:
    if not row["text"]:
        return "ok"
    stats = ", ".join(
        f"T={s['temperature']:.1f} avg_logprob={s['avg_logprob']:.2f} no_speech={s['no_speech_prob']:.2f}"
        for s in row["segments"][:3]
    )
    return f"{row['text']!r} (decoded as {row['decoded_language']}; {stats})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-path", help="LANG=FOLDER[,LANG=FOLDER...]: each adapter is checked in its language")
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", help="write the summary as JSON here")
    args = p.parse_args(argv)
    base = load_model(args.model, dtype=compute_dtype(args.dtype, training=False))
    routes = parse_adapter_routes(args.adapter_path) if args.adapter_path else {}
    if not isinstance(routes, dict):
        p.error("--adapter-path takes LANG=FOLDER pairs")
    models = {"base": (base, "en")}
    models.update({f"{lang}={f}": (with_adapters(base, Path(f)), lang) for lang, f in routes.items()})
    summary = []
    for name, (model, language) in models.items():
        for row in check(model, language):
            summary.append({"model": name, **row})
            print(f"{name:40s} {row['case']:24s} {row['language']:9s} {_verdict(row)}")
    failed = [r for r in summary if r["text"]]
    print(json.dumps({"cases": len(summary), "with_text": len(failed)}))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
