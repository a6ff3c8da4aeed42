"""Check a fused model against base + adapters, mlx_whisper and transformers (fuse.py acceptance).

    python benchmarks/fuse_check.py --model ../shared/models/whisper-base-mlx --adapter-path runs/s5/best \\
        --data ../shared/data/te/validation --language te --work /tmp/fuse_check \\
        --mlx-whisper-python /tmp/mlxw-venv/bin/python --hf-data ../shared/data/en-read --hf-clips 10

1. Greedy tokens (no timestamps) of fused float32 and fused float16 (base dtype) models against
   base + --adapter-path on every clip of --data, and the max relative difference of their logits,
   teacher-forced on the base + adapter tokens: max |fused - unfused| / max |unfused| per clip.
2. transcribe() of the fused folder against mlx_whisper.transcribe(path_or_hf_repo=folder), run
   by --mlx-whisper-python (a venv with mlx-whisper), both at temperature 0 only; and transcribe.py.
3. transformers' WhisperForConditionalGeneration from the --export-hf folder: greedy generate on
   --hf-clips clips of --hf-data (and of --data) against our greedy tokens of the fused model.
Results print as one JSON object (also written to --output).
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from common import ROOT
from models.audio import clip_features, load_audio
from models.export.fuse import FuseConfig, run
from models.inference.decoding import DecodingOptions, DecodingTask
from models.loading import load_model
from models.tokenizer import tokenizer_for
from models.tuner.adapters import load_adapters

MLX_WHISPER_SCRIPT = """
import json, sys, mlx_whisper
folder, language, clips = sys.argv[1], sys.argv[2], sys.argv[3:]
texts = [mlx_whisper.transcribe(c, path_or_hf_repo=folder, language=language, temperature=0.0,
                                fp16=False)["text"] for c in clips]
print("RESULT " + json.dumps(texts))
"""


def clips_of(folder: Path, limit=None):
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file_name"])
    return [str(folder / r["file_name"]) for r in rows][:limit]


def mels(clips):
    return np.stack([clip_features(load_audio(c)) for c in clips])


def greedy_and_features(model, mel: np.ndarray, language: str, batch: int = 4):
    """Greedy tokens and encoder outputs of every clip (features kept for the logit check)."""
    task = DecodingTask(model, DecodingOptions(language=language, without_timestamps=True))
    tokens, features = [], []
    for i in range(0, len(mel), batch):
        f = model.embed_audio(mx.array(mel[i : i + batch]))
        mx.eval(f)
        tokens += [r.tokens for r in task.run(f)]
        features.append(f)
    return tokens, features, task.initial_tokens


def forced_logits(model, features, prompt, tokens, batch: int = 4):
    out = []
    for i, seq in enumerate(tokens):
        f = features[i // batch][i % batch : i % batch + 1]
        out.append(np.array(model.logits(mx.array([prompt + seq]), f)[0].astype(mx.float32)))
    return out


def check_fused(args, work: Path) -> dict:
    clips = clips_of(Path(args.data), args.limit)
    mel = mels(clips)
    reference = load_adapters(load_model(args.model, mx.float32), Path(args.adapter_path))
    ref_tokens, ref_features, prompt = greedy_and_features(reference, mel, args.language)
    ref_logits = forced_logits(reference, ref_features, prompt, ref_tokens)
    del reference
    result = {"clips": len(clips)}
    for name in ("f32", "f16"):
        model = load_model(str(work / name), mx.float32)
        tokens, features, _ = greedy_and_features(model, mel, args.language)
        logits = forced_logits(model, features, prompt, ref_tokens)
        rel = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(logits, ref_logits)]
        same = sum(a == b for a, b in zip(tokens, ref_tokens))
        result[name] = {
            "token_identical": same,
            "token_identical_rate": same / len(clips),
            "logits_max_rel_diff": max(rel),
            "logits_median_rel_diff": float(np.median(rel)),
        }
        print(name, result[name], flush=True)
    return result


def check_mlx_whisper(args, work: Path) -> dict:
    from models.inference.transcribe import transcribe

    clips = clips_of(Path(args.data), args.limit)
    folder = work / "f16"
    model = load_model(str(folder), mx.float32)
    ours = [transcribe(model, c, language=args.language, temperature=0.0)["text"] for c in clips]
    out = subprocess.run(
        [args.mlx_whisper_python, "-c", MLX_WHISPER_SCRIPT, str(folder), args.language, *clips],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    theirs = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    same = sum(a.strip() == b.strip() for a, b in zip(ours, theirs))
    cli_dir = work / "cli"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "transcribe.py"),
            clips[0],
            "--model",
            str(folder),
            "--language",
            args.language,
            "--temperature-increment-on-fallback",
            "none",
            "--output-dir",
            str(cli_dir),
        ],
        check=True,
        capture_output=True,
    )
    cli_text = (cli_dir / (Path(clips[0]).stem + ".txt")).read_text(encoding="utf-8")
    return {
        "clips": len(clips),
        "mlx_whisper_same_text": same,
        "differences": [(a, b) for a, b in zip(ours, theirs) if a.strip() != b.strip()],
        "transcribe_py_same_text": " ".join(cli_text.split()) == " ".join(ours[0].split()),
    }


def check_transformers(args, work: Path) -> dict:
    import torch
    from transformers import WhisperForConditionalGeneration

    hf = WhisperForConditionalGeneration.from_pretrained(str(work / "f16-hf"), dtype=torch.float32).eval()
    ours = load_model(str(work / "f16"), mx.float32)
    result = {}
    for data, language in ((args.hf_data, args.hf_language), (args.data, args.language)):
        clips = clips_of(Path(data), min(args.hf_clips, args.limit or args.hf_clips))
        mel = mels(clips)
        tokens, _, _ = greedy_and_features(ours, mel, language)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor(mel.transpose(0, 2, 1)), language=language, task="transcribe", do_sample=False, num_beams=1
            )
        eot = tokenizer_for(ours, language).eot
        theirs = [[t for t in row.tolist() if t < eot] for row in out]  # prompt and end of text dropped
        same = sum(a == b for a, b in zip(tokens, theirs))
        result[language] = {"clips": len(clips), "token_identical": same}
        print(language, result[language], flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-path", required=True)
    p.add_argument("--data", required=True, help="audiofolder with metadata.csv (the adapter's language)")
    p.add_argument("--language", required=True)
    p.add_argument("--work", default="/tmp/fuse_check")
    p.add_argument("--mlx-whisper-python", default=None, help="python of a venv with mlx-whisper")
    p.add_argument("--limit", type=int, default=None, help="first N clips of --data only (default: all)")
    p.add_argument("--hf-data", default=None, help="audiofolder for the transformers check")
    p.add_argument("--hf-language", default="en")
    p.add_argument("--hf-clips", type=int, default=10)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    work, tic = Path(args.work), time.time()
    run(FuseConfig(args.model, args.adapter_path, str(work / "f16"), export_hf=str(work / "f16-hf"), force=True))
    run(FuseConfig(args.model, args.adapter_path, str(work / "f32"), dtype="float32", force=True))
    result = {"fused": check_fused(args, work)}
    if args.mlx_whisper_python is not None:
        result["mlx_whisper"] = check_mlx_whisper(args, work)
        print(result["mlx_whisper"], flush=True)
    if args.hf_data is not None:
        result["transformers"] = check_transformers(args, work)
    result["seconds"] = round(time.time() - tic, 1)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.output is not None:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
