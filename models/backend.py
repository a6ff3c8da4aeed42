"""Device policy in one place: which backend runs, default dtypes, and per-backend settings.

- CPU (Linux): MLX's CPU wheel links a slow reference BLAS; the scripts re-execute themselves
  with Debian's OpenBLAS (apt package libopenblas0-pthread) in LD_PRELOAD (`ensure_fast_blas`).
  A shared library can only be preloaded when the process starts, hence the re-exec. While a
  model runs, MLX keeps more freed buffers for reuse (`cpu_buffer_cache`).
- CUDA: training caps the work MLX queues before running it (`limit_cuda_queue_memory`).
- Default dtypes: float32 on the CPU (its fast dtype); bfloat16 to train and float16 to
  transcribe on a GPU.
"""

import os
import sys
from contextlib import contextmanager

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
NO_REEXEC_ENV = "WHISPER_MLX_NO_REEXEC"
# MLX's CUDA backend frees an op's temporaries only once the queued batch of work it belongs to
# has run; smaller batches of work lower the training peak for a little speed
# (benchmarks/README.md, "CUDA queue size"). Read by MLX when it first touches the GPU.
CUDA_MAX_MB_PER_BUFFER = "400"
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def has_gpu() -> bool:
    if mx.metal.is_available():
        return True
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available()


def compute_dtype(name, training: bool) -> mx.Dtype:
    """The dtype `name` ("float32", ...), or the default of this device for training or inference."""
    if name is not None:
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
        if name != "float32" and on_cpu():
            # MLX's CPU kernels compute half precision slowly, and Whisper's decoder goes wrong in float16.
            raise ValueError(
                f"--dtype {name} on the CPU gives wrong text or takes far longer; the CPU computes "
                f"in float32 (leave --dtype out)"
            )
        return getattr(mx, name)
    if on_cpu():
        return mx.float32
    return mx.bfloat16 if training else mx.float16


def ensure_fast_blas(library: str = OPENBLAS) -> None:
    """Re-exec this process with `library` in LD_PRELOAD when that would speed MLX up.

    Call it first thing in a CLI `main()`, before any work (the process restarts). It
    returns without doing anything unless: the platform is Linux, `library` exists, it is
    not already in LD_PRELOAD, $WHISPER_MLX_NO_REEXEC is unset (or "" / "0"), and MLX has
    no GPU. The interpreter's original command line (`sys.orig_argv`) is reused, so
    `python -m pkg` and `python -c` runs come back exactly as they were started.
    """
    if not sys.platform.startswith("linux") or not os.path.isfile(library):
        return
    if os.environ.get(NO_REEXEC_ENV, "") not in ("", "0"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if library in preload.replace(" ", ":").split(":"):
        return
    if not sys.executable or has_gpu():
        return
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preload}" if preload else library)
    sys.stdout.flush()  # exec drops anything still buffered
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def limit_cuda_queue_memory() -> None:
    """Set MLX_MAX_MB_PER_BUFFER for training on Linux (CUDA) unless the user set it; call before any GPU work."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", CUDA_MAX_MB_PER_BUFFER)


@contextmanager
def cpu_buffer_cache(dims, dtype: mx.Dtype, batch_size: int = 1):
    """Keep enough freed CPU buffers for reuse while a model of `dims` runs, inside the block.

    MLX keeps only 32 MB of freed CPU buffers by default, so every (heads, 1500, 1500)
    attention score array of the encoder would be page-faulted afresh. The limit is
    process-wide: it is raised to four such arrays for the block and put back afterwards
    (which frees what was kept).
    """
    if not on_cpu():
        yield
        return
    scores = batch_size * dims.n_audio_head * dims.n_audio_ctx**2 * dtype.size
    previous = mx.set_cache_limit(4 * scores)
    if previous > 4 * scores:
        mx.set_cache_limit(previous)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)
