"""Does the data pipeline keep up with the training step? Steps/s of the real training loop with
audio decoded from files against the same batches computed beforehand and held in memory.

Both run `models.tuner.trainer.train` (the loop `lora.py` runs, its compiled step and its
per-step `mx.eval`) on the same model, LoRA settings and batches (same seed, so the same shapes):

- "in memory": one epoch of batches collated once (log-mel features, or encoder outputs when the
  encoder is frozen), evaluated on the device, and replayed in the same order;
- "from files": what `lora.py` does, examples scanned (transcripts and audio headers only), audio
  decoded by `--workers` threads ahead of the step, log-mel computed per batch on the device
  (models/features.py), and with the encoder frozen its outputs computed per batch and kept in an
  on-disk cache (the first epoch computes them, later epochs read them).

Other loaders are timed beside "from files" (lora.py's): "log-mel cache" (features kept in an
on-disk cache, computed from the audio in the first epoch only) and, with the encoder frozen,
"encoder per batch" (its outputs computed on the device for every batch, from the audio or from
the log-mel cache, instead of read from a disk cache).

Rounds alternate (in memory, from files, the other loaders, ...) after a warm-up that compiles
every batch shape; each round reports the median it/s of its 10-step windows. The ratio is
files / memory.

    python benchmarks/data_throughput.py --model ../shared/models/whisper-base-mlx \
        --data ../shared/data/te ../shared/data/yo ../shared/data/sw --batch-size 32 --out-dir outputs/throughput
"""

import argparse
import statistics
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import mlx.core as mx

from common import SHARED, fmt, markdown_table, out_dir, write_results
from models.loading import load_model
from models.tokenizer import tokenizer_for
from models.tuner.adapters import AdapterFolder
from models.tuner.batches import training_batches
from models.tuner.datasets import DropReport, load_local_dataset
from models.tuner.lora import LoRAConfig, linear_to_lora_layers
from models.tuner.pipeline import FeatureLoader, scan_examples
from models.tuner.trainer import Trainer, TrainingArgs, train

# README's Telugu recipe
TARGETS = ["attn.query", "attn.key", "attn.value", "attn.out", "cross_attn.query", "cross_attn.value", "mlp1", "mlp2"]
WINDOW = 10


def scanned_examples(folders, tokenizer) -> list:
    examples = [e for folder in folders for e in load_local_dataset(folder, val_fraction=0.0)["train"]]
    return list(scan_examples(examples, tokenizer, None, DropReport(), verbose=False))


def window_rate(folder: Path) -> dict:
    """Median it/s of the 10-step windows of one `train` call, and how often data was late."""
    from models.tuner.adapters import MetricsLog

    records = [r for r in MetricsLog(folder, enabled=False, resume_step=None).records() if "it_per_s" in r]
    return {
        "it_per_s": statistics.median(r["it_per_s"] for r in records),
        "windows": [round(r["it_per_s"], 2) for r in records],
        "data_late": sum(r["data_late"] for r in records),
        "data_wait_s": sum(r["data_wait_s"] for r in records),
    }


def measure(args, freeze: bool, workdir: Path) -> dict:
    dtype = getattr(mx, args.dtype)
    model = load_model(args.model, dtype=dtype)
    tokenizer = tokenizer_for(model, language="en")
    linear_to_lora_layers(model, LoRAConfig(rank=16, alpha=32, targets=TARGETS, freeze_encoder=freeze))
    examples = scanned_examples(args.data, tokenizer)
    n_mels, steps = model.dims.n_mels, args.rounds_steps
    training = TrainingArgs(
        iters=steps, batch_size=args.batch_size, learning_rate=1e-5, steps_per_report=WINDOW, steps_per_eval=0,
        save_every=10**9, lr_schedule="constant",
    )  # fmt: skip
    trainer = Trainer(model, tokenizer, training, log=lambda *_: None)
    encoder = model if freeze else None
    per_epoch = len(examples) // args.batch_size

    def batches(loader):
        return training_batches(
            examples, args.batch_size, seed=0, loader=loader, pad_to_multiple=training.pad_to_multiple,
            sort_window=training.sort_window,
        )  # fmt: skip

    in_memory = list(islice(batches(FeatureLoader(n_mels, encoder=encoder)), per_epoch))
    mx.eval([b.mel for b in in_memory])
    caches = {name: Path(tempfile.mkdtemp(dir=workdir, prefix=f"{name}-")) for name in ("mel", "encoder")}

    def loader_for(variant: str) -> FeatureLoader:
        """lora.py's loader ("files": with the encoder frozen its outputs go to a disk cache), or one that
        keeps log-mel features in a disk cache ("log-mel cache"), or computes encoder outputs per batch."""
        mel_cache = caches["mel"] if variant.startswith("log-mel cache") else None
        encoder_cache = caches["encoder"] if freeze and variant == "files" else None
        return FeatureLoader(
            n_mels, num_workers=args.workers, cache_dir=mel_cache, encoder=encoder, encoder_cache_dir=encoder_cache
        )

    def run(name: str) -> dict:
        folder = AdapterFolder(workdir / f"{'frozen' if freeze else 'trained'}-{len(results)}", {"lora": {}})
        loader = loader_for(name)
        tic = time.perf_counter()
        if name in ("warm-up", "in memory"):
            train(trainer, examples, [], folder, batch_source=lambda start: cycle(in_memory), loader=loader)
        else:
            train(trainer, examples, [], folder, loader=loader)
        loader.close()
        return {"name": name, "wall_s": time.perf_counter() - tic, **window_rate(folder.metrics)}

    variants = ["files", "log-mel cache"]
    variants += ["encoder per batch", "log-mel cache, encoder per batch"] if freeze else []
    results = []
    results.append(run("warm-up"))  # compiles the step for every batch shape of the epoch
    for _ in range(args.rounds):
        results += [run("in memory")] + [run(v) for v in variants]
    memory = statistics.median(r["it_per_s"] for r in results if r["name"] == "in memory")
    files = [r for r in results if r["name"] == "files"]
    files_rate = statistics.median(r["it_per_s"] for r in files)
    others = {v: statistics.median(r["it_per_s"] for r in results if r["name"] == v) / memory for v in variants}
    return {
        "encoder": "frozen" if freeze else "trained",
        "clips": len(examples),
        "batches_per_epoch": per_epoch,
        "memory_it_per_s": memory,
        "files_it_per_s": files_rate,
        "first_files_round_it_per_s": files[0]["it_per_s"],
        "ratio": files_rate / memory,
        "variant_ratios": others,
        "rounds": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base-mlx"))
    p.add_argument("--data", nargs="+", default=[str(SHARED / "data" / n) for n in ("te", "yo", "sw")])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4, help="audio reading threads (lora.py --num-workers)")
    p.add_argument("--rounds", type=int, default=2, help="alternating in-memory / from-files rounds")
    p.add_argument("--steps", dest="rounds_steps", type=int, default=60, help="training steps per round")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--encoder", choices=["trained", "frozen", "both"], default="both")
    p.add_argument("--out-dir", help="where data_throughput.json/.md go (default: $OUT when set)")
    args = p.parse_args()
    device = str(mx.default_device())
    rows, variant_rows, results = [], [], []
    with tempfile.TemporaryDirectory(prefix="throughput-") as workdir:
        for freeze in {"trained": [False], "frozen": [True], "both": [False, True]}[args.encoder]:
            r = measure(args, freeze, Path(workdir))
            results.append(r)
            rows.append(
                [
                    r["encoder"], r["clips"], fmt(r["memory_it_per_s"], ".2f"), fmt(r["files_it_per_s"], ".2f"),
                    f"{r['ratio']:.2f}", fmt(r["first_files_round_it_per_s"], ".2f"),
                    sum(x["data_late"] for x in r["rounds"] if x["name"] == "files"),
                ]
            )  # fmt: skip
            variant_rows += [[r["encoder"], name, f"{ratio:.2f}"] for name, ratio in r["variant_ratios"].items()]
            print(f"{r['encoder']} encoder: {r['rounds']}", flush=True)
    headers = [
        "encoder", "clips", "in memory it/s", "from files it/s", "files / memory", "first files round it/s",
        "steps with data late",
    ]  # fmt: skip
    title = (
        f"{Path(args.model).name}, batch {args.batch_size}, {args.dtype}, {args.workers} workers, "
        f"{args.rounds} rounds of {args.rounds_steps} steps, {device}"
    )
    table = f"{title}\n\n" + markdown_table(headers, rows)
    table += "\n\nOther loaders, steps/s against in memory:\n\n" + markdown_table(
        ["encoder", "loader", "its / memory"], variant_rows
    )
    print(table)
    write_results(out_dir(args.out_dir), "data_throughput", {"title": title, "results": results}, table)


if __name__ == "__main__":
    main()
