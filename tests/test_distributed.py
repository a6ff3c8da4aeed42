"""Data-parallel training under `mlx.launch`: two CPU processes over the ring backend (localhost)
train like one process with the same global batch, resume included, and only rank 0 writes files.

Tolerances: the runs differ only in the order of float32 reductions (each rank sums its half of
the batch, then the halves are summed), so per-step losses agree to 1e-5 relative and adapter
tensors (|w| ~ 0.1) to 1e-5 absolute; seen here: 2e-7 and 7e-7.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, write_model_folder
from models.audio import SAMPLE_RATE
from models.tokenizer import get_tokenizer
from models.tuner.batches import stream_batches
from models.tuner.datasets import Example

LAUNCH = Path(sys.executable).parent / "mlx.launch"
LOSS_RTOL = 1e-5
ADAPTER_ATOL = 1e-5
WORDS = "the quick brown fox jumps over a lazy dog and then the cat sleeps".split()

# Runs lora.py with an audit hook that lists every file this rank creates, changes or deletes
# under the work folder: the only way to tell ranks apart when they share one disk.
AUDITED_LORA = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    work, root = sys.argv[1], sys.argv[2]
    writes = []
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def hook(event, args):
        if event == "open":
            writing = isinstance(args[0], (str, os.PathLike)) and args[2] & WRITE
        else:
            writing = event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree")
        paths = [os.fspath(args[0])] + ([os.fspath(args[1])] if event == "os.rename" else []) if writing else []
        writes.extend([event, p] for p in paths if p.startswith(work) and "/audit/" not in p)
    def dump():
        with open(os.path.join(work, "audit", "rank%s.json" % os.environ["MLX_RANK"]), "w") as f:
            json.dump(writes, f)
    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = sys.argv[2:]
    runpy.run_path(os.path.join(root, "lora.py"), run_name="__main__")
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny random model and an audiofolder of noise clips with short transcripts."""
    work = tmp_path_factory.mktemp("distributed")
    # n_text_ctx=64 keeps greedy decoding (sample_len = n_text_ctx // 2) short in the evaluations.
    write_model_folder(work / "model", n_text_ctx=64)
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("validation", 3)):
        folder = work / "data" / split
        folder.mkdir(parents=True)
        lines = ["file_name,text"]
        for i in range(n):
            noise = 0.1 * rng.standard_normal(int(SAMPLE_RATE * rng.uniform(0.5, 1.5)))
            sf.write(folder / f"{i}.wav", noise.astype(np.float32), SAMPLE_RATE)
            lines.append(f"{i}.wav,{' '.join(rng.choice(WORDS, rng.integers(2, 8)))}")
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    (work / "audit").mkdir()
    (work / "audited_lora.py").write_text(AUDITED_LORA)
    return work


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def lora(work: Path, adapter_path: str, iters: int, ranks: int = 1, extra: tuple = ()) -> str:
    """Run lora.py (under mlx.launch when ranks > 1); returns its stdout."""
    args = [
        "--model",
        str(work / "model"),
        "--data",
        str(work / "data"),
        "--language",
        "en",
        "--adapter-path",
        str(work / adapter_path),
        "--iters",
        str(iters),
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--lr-schedule",
        "constant",
        "--steps-per-report",
        "1",
        "--steps-per-eval",
        "2",
        "--save-every",
        "2",
        *extra,
    ]
    if ranks == 1:
        command = [sys.executable, str(ROOT / "lora.py"), *args]
    else:
        command = [
            str(LAUNCH),
            "--backend",
            "ring",
            "-n",
            str(ranks),
            "--starting-port",
            str(free_port_pair()),
            "--",
            sys.executable,
            str(work / "audited_lora.py"),
            str(work),
            str(ROOT),
            *args,
        ]
    # One BLAS thread per rank: two ranks share this machine's cores. PYTHONPATH: the audited
    # script runs lora.py from outside the repository.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT)) if ranks > 1 else None
    tic = time.perf_counter()
    # stdin: a pipe never written to (mlx.launch forwards stdin; /dev/null would make it spin).
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, capture_output=True, text=True, timeout=300
    )
    print(f"lora.py on {ranks} rank(s), {iters} iters: {time.perf_counter() - tic:.1f} s")
    # mlx.launch exits 0 even when a rank fails: look for its warning too.
    failed = done.returncode != 0 or "exited with code" in done.stderr or "was killed" in done.stderr
    assert not failed, f"{' '.join(command)}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def records(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def written_by_rank(work: Path) -> list:
    """For each rank of the last launch: the names of the files it wrote under `work`."""
    return [{Path(path).name for _, path in json.loads((work / "audit" / f"rank{r}.json").read_text())} for r in (0, 1)]


@pytest.mark.skipif(not LAUNCH.exists(), reason=f"no mlx.launch beside {sys.executable}")
def test_two_ranks_train_like_one_process_and_resume(work):
    lora(work, "single", iters=4)
    first = lora(work, "ranks", iters=2, ranks=2)  # steps 1-2 on two ranks, then resume for steps 3-4
    first_writes = written_by_rank(work)
    second = lora(work, "ranks", iters=4, ranks=2, extra=("--resume",))
    second_writes = written_by_rank(work)

    single, ranks = records(work / "single"), records(work / "ranks")
    assert [(r["step"], "train_loss" in r) for r in ranks] == [(r["step"], "train_loss" in r) for r in single]
    assert [r["step"] for r in single if "val_loss" in r] == [0, 2, 4]
    worst = {"loss": 0.0, "adapters": 0.0}
    for one, two in zip(single, ranks):
        for key in ("train_loss", "val_loss"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=LOSS_RTOL), (one["step"], key)
                worst["loss"] = max(worst["loss"], abs(two[key] - one[key]) / abs(one[key]))
        if "val_cer" in one:  # edit counts summed over the ranks' halves of the validation set
            assert (two["val_wer"], two["val_cer"]) == pytest.approx((one["val_wer"], one["val_cer"]))
    assert ranks[-2]["train_loss"] < ranks[1]["train_loss"]  # it trained

    for name in ("adapters.safetensors", "best/adapters.safetensors"):
        a, b = mx.load(str(work / "single" / name)), mx.load(str(work / "ranks" / name))
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(np.array(b[key]), np.array(a[key]), rtol=0, atol=ADAPTER_ATOL, err_msg=key)
            worst["adapters"] = max(worst["adapters"], float(mx.abs(a[key] - b[key]).max()))
    print(f"largest differences: loss {worst['loss']:.1e} (relative), adapters {worst['adapters']:.1e}")

    # Only rank 0 writes: rank 1 touched nothing under the work folder, in either run.
    for rank0, rank1 in (first_writes, second_writes):
        assert {"adapters.safetensors", "resume.safetensors", "metrics.jsonl", "loss.png"} <= rank0
        assert rank1 == set()
    assert sorted(p.name for p in (work / "ranks").iterdir()) == sorted(p.name for p in (work / "single").iterdir())
    # ... and only rank 0 prints: every report line appears once.
    for step, output in ((2, first), (4, second)):
        assert output.count(f"Iter {step}: train loss") == 1, output
        assert output.count(f"Iter {step}: val loss") == 1, output


def test_stream_batches_split_each_global_batch_over_ranks(tmp_path):
    """Streaming: every rank reads the stream and takes its half of each global batch of 4 clips."""
    tokenizer = get_tokenizer(multilingual=True, num_languages=99)
    examples = []
    for i in range(9):
        sf.write(tmp_path / f"{i}.wav", np.zeros(SAMPLE_RATE // 2, np.float32), SAMPLE_RATE)
        examples.append(Example(str(tmp_path / f"{i}.wav"), " ".join(WORDS[: i + 1]), "en", f"row{i}"))
    whole = list(stream_batches(examples, tokenizer, 80, None, 4))
    parts = [list(stream_batches(examples, tokenizer, 80, None, 4, rank=r, world_size=2)) for r in (0, 1)]
    assert [b.sources for b in whole] == [[f"row{i}" for i in range(4)], [f"row{i}" for i in range(4, 8)], ["row8"]]
    assert [a.sources + b.sources for a, b in zip(parts[0][:2], parts[1][:2])] == [b.sources for b in whole[:2]]
    # The short last batch leaves rank 1 nothing: it gets a fully masked row, so it still steps.
    assert parts[0][2].sources == ["row8"] and float(parts[1][2].mask.sum()) == 0
    assert [a.n_tokens + b.n_tokens for a, b in zip(*parts)] == [b.n_tokens for b in whole]
