"""Which padding of clips shorter than 30 s gives the better model: the measurement behind
`models.audio.CLIP_PADDING`.

"mel" zero-pads the log-mel past the clip (what transcription does past the end of any
recording); "audio" pads the samples with silence to 30 s first (what transformers' feature
extractor does). For each policy, this runs `lora.py` with the policy set: `--test` of the base
model on each --eval folder, then, with --train-args, a fine-tune on --data and its `--test`.

    python benchmarks/padding_policy.py --model ../shared/models/whisper-base-mlx \
        --eval ../shared/data/en-read --out outputs/padding
    python benchmarks/padding_policy.py --model ../shared/models/whisper-base-mlx --out outputs/padding-te \
        --eval ../shared/data/te/validation --data ../shared/data/te --language te \
        --train-args "--iters 300 --batch-size 16 --learning-rate 2e-4 --warmup 20"

Each line printed is one (policy, model, folder) with greedy WER/CER, as `lora.py --test` scores.
"""

import argparse
import json
import shlex
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
import lora
from models import audio

POLICIES = ("mel", "audio")


def score(model: str, folder: str, adapters: Path, output: Path, language) -> dict:
    argv = ["--test", "--model", model, "--data", folder, "--adapter-path", str(adapters), "--test-output", str(output)]
    if language:
        argv += ["--language", language]
    if lora.main(argv) != 0:
        raise SystemExit(f"lora.py {' '.join(argv)} failed")
    return json.loads(output.read_text(encoding="utf-8").splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--eval", action="append", required=True, help="a folder to score (repeatable)")
    p.add_argument("--data", help="training data for --train-args")
    p.add_argument("--language", help="passed to lora.py")
    p.add_argument("--train-args", help="lora.py training flags; each policy trains its own adapters")
    p.add_argument("--out", required=True, help="a new folder for adapters, predictions and padding.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for policy in POLICIES:
        audio.CLIP_PADDING = policy
        models = [("base", out / "no-adapters")]
        if args.train_args:
            adapters = out / f"adapters-{policy}"
            argv = ["--train", "--model", args.model, "--data", args.data, "--adapter-path", str(adapters)]
            argv += ["--language", args.language] if args.language else []
            if lora.main(argv + ["--overwrite", *shlex.split(args.train_args)]) != 0:
                raise SystemExit(f"training with padding {policy!r} failed")
            models.append(("adapters", adapters / "best"))
        for name, adapters in models:
            for folder in args.eval:
                tag = f"{policy}-{name}-{Path(folder).name}"
                numbers = score(args.model, folder, adapters, out / f"{tag}.jsonl", args.language)
                results.append({"policy": policy, "model": name, "data": folder, **numbers})
                print(f"padding {policy}, {name}, {folder}: WER {100 * numbers['wer']:.2f}%, "
                      f"CER {100 * numbers['cer']:.2f}%", flush=True)  # fmt: skip
    (out / "padding.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
