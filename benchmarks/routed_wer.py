"""WER/CER of per-language adapter routing on a folder of clips: each clip's language is detected
by the base model and the clip goes to that language's adapters (the base model for the rest).

    python benchmarks/routed_wer.py --model ../shared/models/whisper-base-mlx \
        --adapter-path te=adapters/te/best --data ../shared/data/en-read

Greedy decoding without timestamps, as `lora.py --test` scores; prints which route each clip took.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
from models.backend import compute_dtype
from models.inference.decoding import DecodingOptions
from models.inference.routing import AdapterRouter, parse_adapter_routes
from models.inference.transcribe import transcribe_batch
from models.loading import load_model
from models.tuner.datasets import read_manifest
from models.tuner.metrics import corpus_counts, rates_from_counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-path", required=True, help="LANG=FOLDER[,LANG=FOLDER...]")
    p.add_argument("--data", required=True, help="a folder with metadata.csv (or one split folder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args()
    routes = parse_adapter_routes(args.adapter_path)
    if not isinstance(routes, dict):
        p.error("--adapter-path takes LANG=FOLDER pairs here")
    router = AdapterRouter(load_model(args.model, dtype=compute_dtype(None, training=False)), routes)
    examples = read_manifest(args.data)
    groups = {}
    for example in examples:
        model, language = router.route(example.audio, None)
        groups.setdefault((id(model), language), (model, []))[1].append(example)
    refs, hyps, taken = [], [], Counter()
    for (_, language), (model, group) in groups.items():
        options = DecodingOptions(language=language, without_timestamps=True)
        results = transcribe_batch(model, [e.audio for e in group], options, args.batch_size)
        refs += [e.text for e in group]
        hyps += [r["text"] for r in results]
        taken[f"{language} ({'adapters' if model is not router.base else 'base'})"] += len(group)
    wer, cer = rates_from_counts(corpus_counts(refs, hyps))
    numbers = {"data": args.data, "routes": routes, "clips": len(refs), "wer": wer, "cer": cer, "taken": dict(taken)}
    print(f"{len(refs)} clips of {args.data}: WER {100 * wer:.2f}%, CER {100 * cer:.2f}%; routes taken: {dict(taken)}")
    if args.out:
        Path(args.out).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
