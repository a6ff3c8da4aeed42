"""Files the user keeps, written atomically: a crash or a full disk leaves the previous version intact."""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx


@contextmanager
def _disk_full_names(path: Path):
    """Re-raise "no space left" as an error that names `path` and says the old file is intact."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(
            error.errno,
            f"disk full: could not save {path} ({error.strerror}); the previous "
            f"{path.name}, if any, is unchanged. Free some space and try again",
        ) from error


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_output(path: Path, mode: str = "w", **kwargs):
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds.

    The file gets the permissions a plain `open` would give it (the umask is respected).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_full_names(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, mode, **kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_safetensors_atomic(path: Path, arrays: Dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    """mx.save_safetensors to a temp file, then rename: a crash leaves the old file intact."""
    # A Python file object keeps a failed write's errno (disk full); MLX's own writer drops it.
    with atomic_output(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata or {})


@contextmanager
def atomic_folder(folder: Path, force: bool = False):
    """Yield an empty temp folder beside `folder`; it becomes `folder` only if the block succeeds.

    A crash leaves no half-written `folder`; with `force` an existing one is replaced.
    """
    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} already exists; choose another path or pass --force")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        old = None
        if folder.exists():  # move the old folder aside first so one of the two always exists
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
