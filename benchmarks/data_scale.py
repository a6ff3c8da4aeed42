"""Does lora.py's start-up and memory stay flat as a local data set grows? Synthetic sets of 1k, 10k
and 50k clips made from the shared training clips, each trained for a few steps on the CPU.

    python benchmarks/data_scale.py --sizes 1000,10000,50000 --check

Generation: clip i of a set is a perturbed copy of shared clip i mod 192 (te, yo and sw train/,
their transcription and language kept): a gain of +-3 dB, a trim of up to 0.1 s at each end and
Gaussian noise of std 1e-4 to 5e-4, drawn from (--seed, i) alone, written as a 16 kHz mono FLAC.
The clips live in one pool, `<sets-dir>/clips-s<seed>/NNN/NNNNNN.flac` (1000 per folder); set
`n<N>/metadata.csv` lists its first N clips (file_name `../clips-s<seed>/...`), so smaller sets
share the larger ones' files. A worker pool writes one folder at a time and marks it complete
(`.complete`) when its last file is written; a set's `.complete` (size and seed) is written after
its metadata. An interrupted generation is redone from the first unmarked folder on the next run;
a marked set is reused as it is.

Measurement, per size: `lora.py --data n<N> --val-fraction 0 --steps-per-eval 0
--steps-per-report 1 --iters STEPS --batch-size B` from the repository root, with OpenBLAS in
LD_PRELOAD (so lora.py does not re-exec itself). Its output is read line by line as it streams:
time to the first step is when "Iter 1:" appears, counted from just before the process starts;
the times of its start-up lines (model and manifest loaded, training clips scanned) are kept too.
Peak RSS is the child's `ru_maxrss` from `os.wait4` (its own peak, or that of a child it waited
for, whichever is larger; decoding threads are in the same process). The files are in the page
cache right after generation, so header reads are warm.

Criteria (the smallest and largest of --sizes): peak RSS at the largest <= 1.2x the smallest, and
the first step within 15 s at the largest. The table and PASS/FAIL lines are printed and written
to --out-dir as data_scale.md / data_scale.json; --check exits 1 when a criterion fails.
"""

import argparse
import csv
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile

from common import ROOT, SHARED, fmt, markdown_table, out_dir, write_results

SAMPLE_RATE = 16000
PER_FOLDER = 1000
MARKER = ".complete"
SOURCE_LANGUAGES = ("te", "yo", "sw")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
MAX_RSS_RATIO = 1.2
MAX_FIRST_STEP_S = 15.0
# lora.py's start-up lines, (name, prefix); the time each first appears is kept. "Trainable
# parameters" follows loading the model and reading the manifest; "train: " ends the scan of the
# training clips (transcripts tokenized, audio headers read).
PHASES = (
    ("loaded", "Trainable parameters"), ("train_scanned", "train: "), ("examples_ready", "Examples ready"),
    ("first_step", "Iter 1:"),
)  # fmt: skip


# --- Source clips -------------------------------------------------------------------------------


def source_rows(data: Path = SHARED / "data", languages: Sequence[str] = SOURCE_LANGUAGES) -> List[dict]:
    """{audio, transcription, language} of each clip of `data/<language>/train/metadata.csv`, in order."""
    rows = []
    for language in languages:
        folder = data / language / "train"
        with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                missing = {"file_name", "transcription"} - set(row)
                if missing:
                    raise ValueError(f"{folder / 'metadata.csv'}:{line}: no {', '.join(sorted(missing))} column")
                language_of_row = row.get("language") or language
                rows.append({"audio": str(folder / row["file_name"]), "transcription": row["transcription"],
                             "language": language_of_row})  # fmt: skip
    if not rows:
        raise ValueError(f"no source clips under {data} ({', '.join(languages)})")
    return rows


def read_source(path: str) -> np.ndarray:
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz; the source clips must be {SAMPLE_RATE} Hz (no resampling here)")
    return audio.mean(axis=1)


def perturb(audio: np.ndarray, seed: int, index: int) -> np.ndarray:
    """Copy `index` of `audio`: gain of +-3 dB, up to 0.1 s trimmed at each end, a little Gaussian
    noise; drawn from (seed, index) alone, so a copy is the same whichever process writes it."""
    rng = np.random.default_rng([seed, index])
    gain = 10 ** (rng.uniform(-3.0, 3.0) / 20)
    max_trim = min(SAMPLE_RATE // 10, len(audio) // 8)  # a short clip keeps at least 3/4 of itself
    start, cut_end = rng.integers(0, max_trim + 1, size=2)
    noise_std = rng.uniform(1e-4, 5e-4)
    trimmed = audio[start : len(audio) - cut_end]
    noisy = gain * trimmed + noise_std * rng.standard_normal(len(trimmed), dtype=np.float32)
    return np.clip(noisy, -1.0, 1.0).astype(np.float32)


# --- Generation ---------------------------------------------------------------------------------


def clip_name(index: int) -> str:
    return f"{index // PER_FOLDER:03d}/{index:06d}.flac"


def pool_folder(sets_dir: Path, seed: int) -> Path:
    return sets_dir / f"clips-s{seed}"


def _read_marker(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, values: dict) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(values) + "\n")
    os.replace(temp, path)


def folder_done(folder: Path, seed: int, count: int) -> bool:
    """The folder's marker says it holds at least `count` clips drawn with `seed`."""
    marker = _read_marker(folder / MARKER)
    return marker is not None and marker.get("seed") == seed and marker.get("count", -1) >= count


_sources: List[np.ndarray] = []  # each worker's decoded source clips (set by _load_sources)


def _load_sources(paths: Sequence[str]) -> None:
    _sources[:] = [read_source(p) for p in paths]


def _write_folder(job) -> int:
    """Write clips [first, first + count) into `pool/NNN/` and mark it; the count written."""
    pool, seed, first, count = job
    folder = pool / f"{first // PER_FOLDER:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(first, first + count):
        audio = perturb(_sources[index % len(_sources)], seed, index)
        soundfile.write(pool / clip_name(index), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    _write_marker(folder / MARKER, {"seed": seed, "count": count})
    return count


def write_pool(pool: Path, size: int, seed: int, sources: Sequence[dict], workers: int) -> int:
    """Make sure clips [0, size) exist in `pool`, folder by folder; the number of clips written."""
    jobs = []
    for first in range(0, size, PER_FOLDER):
        count = min(PER_FOLDER, size - first)
        if not folder_done(pool / f"{first // PER_FOLDER:03d}", seed, count):
            jobs.append((pool, seed, first, count))
    if not jobs:
        return 0
    paths = [row["audio"] for row in sources]
    if workers <= 1 or len(jobs) == 1:
        _load_sources(paths)
        return sum(_write_folder(job) for job in jobs)
    written = 0
    with multiprocessing.Pool(min(workers, len(jobs)), initializer=_load_sources, initargs=(paths,)) as pool_:
        for count in pool_.imap_unordered(_write_folder, jobs):
            written += count
            print(f"  {written} of {sum(j[3] for j in jobs)} clips written", file=sys.stderr, flush=True)
    return written


def generate_set(sets_dir: Path, size: int, seed: int, sources: Sequence[dict], workers: int = 1) -> dict:
    """Make (or reuse) `sets_dir/n<size>`: metadata.csv of `size` perturbed clips, marked complete.

    Returns {"path", "size", "seed", "reused", "generation_s", "clips_written", "disk_bytes"}.
    """
    if size < 1:
        raise ValueError(f"a set needs at least one clip, got {size}")
    tic = time.perf_counter()
    folder, pool = sets_dir / f"n{size}", pool_folder(sets_dir, seed)
    marker = _read_marker(folder / MARKER)
    reused = marker == {"size": size, "seed": seed} and all(
        folder_done(pool / f"{first // PER_FOLDER:03d}", seed, min(PER_FOLDER, size - first))
        for first in range(0, size, PER_FOLDER)
    )
    written = 0
    if not reused:
        (folder / MARKER).unlink(missing_ok=True)
        written = write_pool(pool, size, seed, sources, workers)
        write_metadata(folder, pool, size, sources)
        _write_marker(folder / MARKER, {"size": size, "seed": seed})
    disk = sum((pool / clip_name(i)).stat().st_size for i in range(size))
    return {"path": str(folder), "size": size, "seed": seed, "reused": reused,
            "generation_s": time.perf_counter() - tic, "clips_written": written, "disk_bytes": disk}  # fmt: skip


def write_metadata(folder: Path, pool: Path, size: int, sources: Sequence[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / "metadata.csv.tmp"
    prefix = os.path.relpath(pool, folder)
    with open(temp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription", "language"])
        for index in range(size):
            row = sources[index % len(sources)]
            writer.writerow([f"{prefix}/{clip_name(index)}", row["transcription"], row["language"]])
    os.replace(temp, folder / "metadata.csv")


# --- Measurement --------------------------------------------------------------------------------


def lora_command(python: str, model: str, data: str, adapter_path: str, steps: int, batch_size: int) -> List[str]:
    return [python, str(ROOT / "lora.py"), "--model", model, "--data", data, "--adapter-path", adapter_path,
            "--val-fraction", "0", "--steps-per-eval", "0", "--steps-per-report", "1", "--iters", str(steps),
            "--batch-size", str(batch_size), "--no-report", "--overwrite"]  # fmt: skip


def child_env() -> Dict[str, str]:
    """This environment with OpenBLAS first in LD_PRELOAD (lora.py then has no reason to re-exec)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    preload = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if os.path.isfile(OPENBLAS) and OPENBLAS not in preload:
        env["LD_PRELOAD"] = ":".join([OPENBLAS] + preload)
    return env


def measure(cmd: List[str], timeout: float = 1800.0, echo: bool = True) -> dict:
    """Run `cmd` from the repository root; seconds to each of PHASES' lines, wall seconds, peak RSS.

    Lines are read as they stream (tqdm's carriage returns end a line too); the child is killed
    after `timeout` seconds. Returns {"phases_s", "wall_s", "peak_rss_mb", "returncode", "tail"}.
    """
    tic = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        encoding="utf-8", errors="replace",
    )  # fmt: skip
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    phases, tail = {}, []
    for line in proc.stdout:
        now = time.perf_counter() - tic
        line = line.rstrip("\n")
        for name, prefix in PHASES:
            if name not in phases and line.startswith(prefix):
                phases[name] = now
        if line.strip() and not line.startswith("Reading "):  # tqdm's progress bar redraws
            tail = (tail + [line])[-40:]
            if echo:
                print(f"  [{now:7.1f} s] {line}", file=sys.stderr, flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    proc.stdout.close()
    return {"phases_s": phases, "first_step_s": phases.get("first_step"), "wall_s": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": proc.returncode, "tail": tail}  # fmt: skip


def measure_set(data: str, model: str, steps: int, batch_size: int, python: str = sys.executable, **kw) -> dict:
    """`measure` of lora.py training on `data`, with a throw-away adapter folder."""
    with tempfile.TemporaryDirectory(prefix="data-scale-adapters-") as adapters:
        return measure(lora_command(python, model, data, adapters, steps, batch_size), **kw)


# --- Report ---------------------------------------------------------------------------------------


def criteria(rows: Sequence[dict]) -> List[dict]:
    """The two acceptance checks on the smallest and largest sizes of `rows`."""
    smallest, largest = min(rows, key=lambda r: r["size"]), max(rows, key=lambda r: r["size"])
    ratio = None
    if smallest["peak_rss_mb"] and largest["returncode"] == 0 and smallest["returncode"] == 0:
        ratio = largest["peak_rss_mb"] / smallest["peak_rss_mb"]
    first = largest["first_step_s"]
    return [
        {"name": f"peak RSS at {largest['size']} <= {MAX_RSS_RATIO}x peak RSS at {smallest['size']}",
         "value": ratio, "passed": ratio is not None and ratio <= MAX_RSS_RATIO},
        {"name": f"time to the first step at {largest['size']} <= {MAX_FIRST_STEP_S:.0f} s",
         "value": first, "passed": first is not None and first <= MAX_FIRST_STEP_S},
    ]  # fmt: skip


def report(rows: Sequence[dict], checks: Sequence[dict]) -> str:
    smallest = min(rows, key=lambda r: r["size"])
    headers = ["clips", "files on disk GB", "generation s", "model + manifest s", "train scanned s",
               "time to first step s", "wall s", "peak RSS MB", f"RSS / {smallest['size']}", "exit"]  # fmt: skip
    table = []
    for r in rows:
        ratio = r["peak_rss_mb"] / smallest["peak_rss_mb"] if smallest["peak_rss_mb"] else None
        generated = f"{r['generation_s']:.1f}" + (" (reused)" if r["reused"] else "")
        table.append([r["size"], f"{r['disk_bytes'] / 1e9:.2f}", generated, fmt(r["phases_s"].get("loaded")),
                      fmt(r["phases_s"].get("train_scanned")), fmt(r["first_step_s"]), fmt(r["wall_s"]),
                      f"{r['peak_rss_mb']:.0f}", fmt(ratio, ".2f"), r["returncode"]])  # fmt: skip
    lines = [markdown_table(headers, table), ""]
    for c in checks:
        value = fmt(c["value"], ".2f")
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}: {c['name']} (measured {value})")
    return "\n".join(lines)


def sizes(value: str) -> List[int]:
    try:
        found = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        message = f"expected comma-separated clip counts like 1000,10000, got {value!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not found or min(found) < 1:
        raise argparse.ArgumentTypeError(f"expected clip counts of at least 1, got {value!r}")
    return sorted(set(found))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=sizes, default="1000,10000,50000", help="clips per set (default: %(default)s)")
    p.add_argument("--sets-dir", default=str(ROOT / "benchmarks" / "data_scale_sets"), help="where the sets are kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generation processes (default: all cores)")
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base-mlx"))
    p.add_argument("--steps", type=int, default=50, help="training steps per size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one training run may take")
    p.add_argument("--out-dir", help="where data_scale.json/.md go (default: $OUT, else benchmarks/results)")
    p.add_argument("--check", action="store_true", help="exit 1 when a criterion fails")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sets_dir = Path(args.sets_dir)
    sources = source_rows()
    rows = []
    for size in args.sizes:
        print(f"n{size}: generating in {sets_dir}", file=sys.stderr, flush=True)
        made = generate_set(sets_dir, size, args.seed, sources, args.workers)
        print(f"n{size}: training {args.steps} steps at batch {args.batch_size}", file=sys.stderr, flush=True)
        run = measure_set(made["path"], args.model, args.steps, args.batch_size, timeout=args.timeout)
        rows.append({**made, **run})
    checks = criteria(rows)
    text = report(rows, checks)
    print(text)
    folder = out_dir(args.out_dir) or out_dir(str(ROOT / "benchmarks" / "results"))
    command = [sys.executable, *sys.orig_argv[1:]]
    payload = {"command": command, "cpu_count": os.cpu_count(), "model": args.model, "steps": args.steps,
               "batch_size": args.batch_size, "rows": rows, "criteria": checks}  # fmt: skip
    write_results(folder, "data_scale", payload, text)
    return 1 if args.check and not all(c["passed"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
