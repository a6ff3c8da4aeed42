"""Swap MLX's slow reference BLAS for OpenBLAS on Linux CPU by re-executing with LD_PRELOAD.

The Linux `mlx[cpu]` wheel links a reference BLAS (~8 GFLOP/s); Debian's OpenBLAS
(apt package libopenblas0-pthread) makes a Whisper training step ~6.5x faster. A shared
library can only be preloaded when the process starts, hence the re-exec.
"""

import os
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
NO_REEXEC_ENV = "WHISPER_MLX_NO_REEXEC"


def _has_gpu() -> bool:
    import mlx.core as mx  # importing before exec is harmless: exec replaces the process

    if mx.metal.is_available():
        return True
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available()


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
    if not sys.executable or _has_gpu():
        return
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preload}" if preload else library)
    sys.stdout.flush()  # exec drops anything still buffered
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
