"""An on-disk cache of per-clip arrays (log-mel features, frozen-encoder outputs), read memory-mapped.

One file per entry, named by a key of the clip's audio content, under a folder named by the
settings that produced it (feature kind, mel bins, padding policy, encoder weights), so one
`--feature-cache` folder serves many datasets, runs and models. An entry is written to a
temporary file and renamed into place, and carries a checksum of its payload: an entry cut short
by a killed run, or damaged later, fails the check, is removed, and is computed again.
"""

import hashlib
import json
import os
import threading
import uuid
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

MAGIC = b"WLCACHE2"
KEY_SIZE = 16
HEADER = len(MAGIC) + 8  # magic, then the payload's CRC-32 and byte count (4 bytes each)


def content_key(*parts: Union[bytes, str, int, None]) -> str:
    """A hex key of byte strings and small values (an audio file's bytes, a sample range)."""
    h = hashlib.blake2b(digest_size=KEY_SIZE)
    for part in parts:
        data = part if isinstance(part, (bytes, bytearray, memoryview)) else repr(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class ArrayCache:
    """Arrays of one fixed `shape` and `dtype` under `root`/<settings hash>/; thread-safe."""

    def __init__(self, root: Union[str, Path], settings: dict, shape: Tuple[int, ...], dtype=np.float16):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.size = int(np.prod(self.shape)) * self.dtype.itemsize
        described = json.dumps({**settings, "shape": list(self.shape), "dtype": self.dtype.str}, sort_keys=True)
        self.folder = Path(root) / content_key(described.encode())[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.exists():  # for a person looking into the folder
            _write_atomic(settings_file, described.encode())
        self.hits = self.misses = self.corrupt = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.bin"

    def get(self, key: str) -> Optional[np.ndarray]:
        """The entry of `key` (memory-mapped, read-only), or None when absent or damaged (then removed)."""
        path = self.path(key)
        try:
            if path.stat().st_size != HEADER + self.size:
                return self._damaged(path)
            with open(path, "rb") as f:
                header = f.read(HEADER)
            array = np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER, shape=self.shape)
        except FileNotFoundError:
            self._count("misses")
            return None
        except (OSError, ValueError):
            return self._damaged(path)
        if header != _header(array):
            return self._damaged(path)
        self._count("hits")
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape != self.shape:
            raise ValueError(f"cache entry of shape {array.shape}, expected {self.shape}")
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, _header(array) + array.tobytes())

    def stats(self) -> str:
        return f"{self.hits} read, {self.misses} computed" + (f", {self.corrupt} damaged" if self.corrupt else "")

    def _damaged(self, path: Path) -> None:
        self._count("corrupt")
        self._count("misses")
        try:
            path.unlink()
        except OSError:
            pass
        return None

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


def _header(array: np.ndarray) -> bytes:
    """MAGIC, the CRC-32 of the payload and its size: any damaged or cut byte fails the check. (CRC-32, not a
    cryptographic digest: it catches every burst error up to 32 bits and reads at several GB/s.)"""
    payload = memoryview(np.ascontiguousarray(array)).cast("B")
    return MAGIC + zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(4, "little")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, then rename it: a reader sees the whole entry or none."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
