"""The one helper for atomic, durable local writes: temp file beside the target, fsync, rename, fsync folder."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = ".tmp-"  # listings skip these: a write in flight, or one a killed process left behind
LOCK_PREFIX = ".lock-"  # and these: the lock files of local read-compare-write sequences


def temporary_name(path: Path) -> Path:
    """A sibling temp name unique to this write (a retried task and its lost original may write at once).

    The target's name stays at the end, so suffix-sensitive writers (Keras wants .weights.h5) accept it.
    """
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in folder durable (the folder entry is what a power loss would otherwise lose)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the data itself was synced
    finally:
        os.close(handle)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success its data is synced and renamed onto path, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        # Data reaches the disk before the rename publishes it: a marker never points at an empty file.
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write data to path atomically and durably; mode (e.g. 0o600 for secrets) is set before it appears."""
    with atomic_path(path) as tmp:
        if mode is None:
            tmp.write_bytes(data)
            return
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(handle, "wb") as out:
            os.fchmod(out.fileno(), mode)  # whatever the umask
            out.write(data)
