"""What one training batch costs on its way to the device, piece by piece (whisper-base, batch 32).

The data pipeline (models/tuner/pipeline.py) turns a batch of audio files into model inputs. This
times each piece alone, median of `--reps` after a warm-up, to find where files-fed training
loses to batches held in memory (data_throughput.py):

- host to device: an MLX array made from a NumPy batch (audio samples, log-mel features, frozen
  encoder outputs), then read by a device kernel; made on the calling thread or in a worker thread;
- host stacking: 32 rows read from memory-mapped cache files into one NumPy batch;
- log-mel on the device (models/features.py) and the encoder forward pass (random weights of the
  real shape), which the in-memory batches have already paid for;
- the step's device work while reading threads decode audio files (`--audio`): how much the
  threads slow the training thread.

    python benchmarks/batch_costs.py --audio ../shared/data/te/train --out-dir outputs/batch_costs
"""

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common import fmt, markdown_table, out_dir, time_calls, write_results
from models.features import clip_features_batch
from models.whisper import ModelDimensions, Whisper

BASE = ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6)


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    return 1e3 * statistics.median(time_calls(fn, warmup, reps))


def transfer_row(name: str, hosts: list, reps: int, pool: ThreadPoolExecutor) -> list:
    """[what, MB, ms to make the array, ms to make and read it on the device, the same made in a thread, equal]."""
    turn = iter(range(10**9))

    def made():
        return mx.array(hosts[next(turn) % len(hosts)])

    def read():
        mx.eval(made().astype(mx.float32).sum())

    def read_threaded():  # made by a worker, read here: what the collating thread hands over
        mx.eval(pool.submit(made).result().astype(mx.float32).sum())

    exact = bool(mx.array_equal(pool.submit(lambda: mx.array(hosts[0])).result(), mx.array(hosts[0])).item())
    times = [median_ms(fn, reps) for fn in (made, read, read_threaded)]
    return [name, f"{hosts[0].nbytes / 1e6:.0f}", *(fmt(t, ".2f") for t in times), exact]


def transfer_rows(batch: int, reps: int, pool: ThreadPoolExecutor) -> list:
    rng = np.random.default_rng(0)
    shapes = {
        "audio samples f32 (B, 10 s)": ((batch, 160_000), np.float32),
        "log-mel f16 (B, 3000, 80)": ((batch, 3000, 80), np.float16),
        "encoder out f16 (B, 1500, 512)": ((batch, 1500, 512), np.float16),
    }
    return [
        transfer_row(name, [rng.standard_normal(shape).astype(dtype) for _ in range(4)], reps, pool)
        for name, (shape, dtype) in shapes.items()
    ]


def stacking_ms(batch: int, reps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(batch):
            path = Path(folder) / f"{i}.npy"
            np.save(path, np.full((1500, 512), i, np.float16))
            paths.append(path)
        return median_ms(lambda: np.stack([np.load(p, mmap_mode="r") for p in paths]), reps)


def device_rows(batch: int, reps: int, dtype) -> list:
    samples = mx.array(np.random.default_rng(1).standard_normal((batch, 160_000), np.float32))
    lengths = [160_000 - 1000 * i for i in range(batch)]
    model = Whisper(BASE, dtype=dtype)
    mel = mx.random.normal((batch, 3000, 80)).astype(dtype)
    mx.eval(samples, mel, model.parameters())
    log_mel = median_ms(lambda: mx.eval(clip_features_batch(samples, lengths, 80)), reps)
    encoder = median_ms(lambda: mx.eval(model.embed_audio(mel)), reps)
    return [["log-mel of the batch on the device", fmt(log_mel, ".2f")], ["encoder forward", fmt(encoder, ".2f")]]


def contention_rows(batch: int, reps: int, dtype, audio: list, workers: int) -> list:
    """The device work of an encoder forward + backward while `workers` threads decode `audio` files."""
    from models.tuner.sources import read_samples

    model = Whisper(BASE, dtype=dtype)
    mel = mx.random.normal((batch, 3000, 80)).astype(dtype)
    grad = nn.value_and_grad(model, lambda x: model.embed_audio(x).astype(mx.float32).mean())
    step = lambda: mx.eval(grad(mel))  # noqa: E731
    rows = [["no reading threads", fmt(median_ms(step, reps), ".2f"), 0]]
    if not audio:
        return rows
    stop, decoded = threading.Event(), [0]

    def reader(offset: int):
        k = offset
        while not stop.is_set():
            read_samples(str(audio[k % len(audio)]))
            decoded[0] += 1
            k += workers

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    tic, before = time.perf_counter(), decoded[0]
    loaded = median_ms(step, reps)
    rate = (decoded[0] - before) / (time.perf_counter() - tic)
    stop.set()
    for t in threads:
        t.join()
    rows.append([f"{workers} threads decoding files ({rate:.0f} files/s)", fmt(loaded, ".2f"), workers])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--audio", nargs="*", default=[], help="folders of audio files for the contention rows")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out-dir")
    args = p.parse_args()
    dtype, b, reps = getattr(mx, args.dtype), args.batch_size, args.reps
    audio = sorted(f for folder in args.audio for f in Path(folder).rglob("*") if f.suffix in (".wav", ".flac", ".mp3"))
    with ThreadPoolExecutor(1) as pool:
        transfer = transfer_rows(b, reps, pool)
    stacking = [[f"stack {b} memory-mapped rows (1500, 512) f16", fmt(stacking_ms(b, reps), ".2f")]]
    contention = contention_rows(b, reps, dtype, audio, args.workers)
    headers = ["batch", "MB", "array made ms", "made + read on device ms", "made in a thread + read ms", "equal"]
    tables = [
        markdown_table(headers, transfer),
        markdown_table(["host work", "ms"], stacking),
        markdown_table(["device work", "ms"], device_rows(b, reps, dtype)),
        markdown_table(["encoder forward + backward", "ms", "threads"], contention),
    ]
    title = f"batch {b}, {args.dtype}, {mx.default_device()}, median of {reps}"
    table = f"{title}\n\n" + "\n\n".join(tables)
    print(table)
    write_results(out_dir(args.out_dir), "batch_costs", {"title": title, "tables": tables}, table)


if __name__ == "__main__":
    main()
