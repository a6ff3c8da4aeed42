"""Helpers shared by the benchmark scripts: timing, worker subprocesses, result files.

Standard library only at import time (the PyTorch helpers import torch when called): the
scripts import this before they know which framework a worker will load (MLX, PyTorch, or
faster-whisper in its own virtual environment). Importing it puts the repository on sys.path.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"  # the real models and speech, beside the repository
RESULT_PREFIX = "RESULT "


def use_code_from(root: Path = ROOT) -> None:
    """Import models/ and utils.py from `root` (first on sys.path): `python benchmarks/NAME.py` puts
    only benchmarks/ there. Importing this module does it for the repository itself."""
    root = str(Path(root).resolve())
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)


use_code_from(ROOT)


def time_calls(fn: Callable[[], None], warmup: int, steps: int) -> List[float]:
    """Seconds of each of `steps` calls of `fn` after `warmup` untimed ones.

    `fn` must block until the device is done (mx.eval / torch.cuda.synchronize inside).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return times


def summary(times: Sequence[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def emit_result(result: dict) -> None:
    """A worker's last line on stdout: what the parent reads back."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def worker_main(fn, args) -> int:
    """Run a worker and emit its result; an exception (out of memory, say) becomes {"error": ...}."""
    try:
        result = fn(args)
    except Exception as error:  # reported in the table instead of losing the whole run
        import traceback

        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        result = {"error": f"{type(error).__name__}: {first_line[:200]}"}
    emit_result(result)
    return 0


def torch_setup(smoke: bool, *packages: str):
    """PyTorch's side of a worker: (torch, device, sync), after importing torch, transformers and
    `packages`. Without them smoke mode returns {"skipped": ...} (the worker's result) and a real
    run fails; so does a real run without CUDA."""
    import importlib

    try:
        for name in ("torch", "transformers", *packages):
            importlib.import_module(name)
    except ImportError as error:
        if smoke:
            return {"skipped": f"{error.name} is not installed (smoke mode)"}
        raise
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise SystemExit("PyTorch sees no CUDA device; the benchmark needs the GPU (or pass --smoke)")
    return torch, torch.device("cuda" if cuda else "cpu"), torch.cuda.synchronize if cuda else (lambda: None)


def transformers_whisper(shape, attn: str, device, dtype, **config):
    """transformers' WhisperForConditionalGeneration with `shape`'s dimensions and random weights
    (seed 0), built on `device` in `dtype`; `config` adds WhisperConfig fields."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=shape.n_vocab,
        num_mel_bins=shape.n_mels,
        d_model=shape.n_state,
        encoder_layers=shape.n_layer,
        encoder_attention_heads=shape.n_head,
        encoder_ffn_dim=4 * shape.n_state,
        decoder_layers=shape.n_layer,
        decoder_attention_heads=shape.n_head,
        decoder_ffn_dim=4 * shape.n_state,
        max_source_positions=1500,
        max_target_positions=448,
        dropout=0.0,
        **config,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return WhisperForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)


def run_worker(cmd: List[str], timeout: float, env: Optional[dict] = None) -> dict:
    """Run a worker subprocess; its stderr streams through, its RESULT line is parsed.

    A crash, a timeout or a missing result comes back as {"error": ...} instead of raising,
    so one out-of-memory configuration does not lose the others.
    """
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    # The repository first, then whatever was there (on the GPU machine: /tmp/site with MLX).
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    timeout = None if timeout == float("inf") else max(timeout, 1.0)
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, env=full_env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        return json.loads(lines[-1][len(RESULT_PREFIX) :])
    tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
    return {"error": f"worker exited with {proc.returncode} and no result{': ' + tail if tail else ''}"}


def seconds_left(deadline: Optional[float]) -> float:
    """Seconds until `deadline` (a Unix time), or infinity without one."""
    return float("inf") if deadline is None else deadline - time.time()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def out_dir(cli_value: Optional[str]) -> Optional[Path]:
    """--out-dir, else $OUT (set on the GPU machine), else None (print only)."""
    value = cli_value or os.environ.get("OUT")
    if not value:
        return None
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(folder: Optional[Path], name: str, payload: dict, table: str) -> None:
    if folder is None:
        return
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (folder / f"{name}.md").write_text(table + "\n")
    print(f"wrote {folder / (name + '.json')} and {name}.md", file=sys.stderr)


def fmt(value, spec: str = ".1f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def worker_command(python: str, script: str, framework: str, **flags) -> list:
    """The command line of a benchmark's worker process: `--worker FRAMEWORK --flag value ...`;
    a flag whose value is True is given alone, False or None leaves it out."""
    cmd = [python, str(Path(script).resolve()), "--worker", framework]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd
