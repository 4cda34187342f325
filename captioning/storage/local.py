"""Local paths and file:// URIs: atomic writes, the local If-None-Match (a hard link) and If-Match (a lock file)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from captioning.atomic import LOCK_PREFIX, TEMP_PREFIX, atomic_path, atomic_write, fsync_folder, temporary_name
from captioning.storage import StorageError, local_path


class LocalBackend:
    """Files under a local path; every OS error becomes one StorageError naming the path."""

    def read_bytes(self, uri: str, max_bytes: int | None) -> bytes:
        """A regular file's bytes, its size checked first: never a FIFO (hangs) or a device (/dev/zero)."""
        path = local_path(uri)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; the type check below then refuses it.
            handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as err:
            raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
        with os.fdopen(handle, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise StorageError(uri, "not a regular file", "unreadable")
            if max_bytes is not None and info.st_size > max_bytes:
                raise StorageError(uri, f"file of {info.st_size} bytes is over the {max_bytes} byte limit",
                                   "too_large")
            data = file.read() if max_bytes is None else file.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew after the check
            raise StorageError(uri, f"file is over the {max_bytes} byte limit", "too_large")
        return data

    def write_bytes(self, uri: str, data: bytes, content_type: str | None) -> None:
        """A synced temp file beside the target, then a rename."""
        try:
            atomic_write(local_path(uri), data)
        except OSError as err:
            raise StorageError(uri, f"cannot write: {err.strerror or err}", "unwritable") from None

    def read_stamped(self, uri: str) -> tuple[bytes, str, float] | None:
        """(content, sha256, seconds since its mtime) or None."""
        path = local_path(uri)
        try:
            data = path.read_bytes()
            modified = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
        return data, hashlib.sha256(data).hexdigest(), max(0.0, time.time() - modified)

    def age(self, uri: str) -> float | None:
        """Seconds since the file's mtime; None if absent."""
        try:
            return max(0.0, time.time() - local_path(uri).stat().st_mtime)
        except FileNotFoundError:
            return None

    def create(self, uri: str, data: bytes) -> str | None:
        """A complete file linked into place: refused (None) if the path exists."""
        path = local_path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(uri, f"cannot create its folder: {err.strerror or err}", "unwritable") from None
        staged = temporary_name(path)
        try:
            with open(staged, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(staged, path)  # atomic, complete, and refused if path exists: the local If-None-Match
            fsync_folder(path.parent)
            return hashlib.sha256(data).hexdigest()
        except FileExistsError:
            return None
        except OSError as err:
            raise StorageError(uri, f"cannot write: {err.strerror or err}", "unwritable") from None
        finally:
            staged.unlink(missing_ok=True)

    def replace_if(self, uri: str, data: bytes, tag: str) -> str | None:
        """Compare and write under a lock beside the file."""
        path = local_path(uri)
        with _locked(path):
            current = self.read_stamped(uri)
            if current is None or current[1] != tag:
                return None
            atomic_write(path, data)
            return hashlib.sha256(data).hexdigest()

    def delete(self, uri: str) -> None:
        """Remove the file; absent is fine."""
        local_path(uri).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        """Remove the folder; absent is fine."""
        shutil.rmtree(local_path(prefix), ignore_errors=True)

    def check_writable(self, prefix: str) -> None:
        """The folder exists or can be made."""
        try:
            local_path(prefix).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(prefix, f"cannot create this folder: {err.strerror or err}", "unwritable") from None

    def describe(self, uri: str) -> dict[str, int | str]:
        """Size and sha256."""
        path = local_path(uri)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError as err:
            raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
        return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}

    def upload_file(self, path: Path, uri: str, content_type: str | None) -> None:
        """A copy, atomically in place."""
        with atomic_path(local_path(uri)) as tmp:
            shutil.copyfile(path, tmp)

    def download_file(self, uri: str, path: Path) -> None:
        """A copy to path."""
        try:
            shutil.copyfile(local_path(uri), path)
        except OSError as err:
            raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None

    def exists(self, uri: str) -> bool:
        """Whether the path exists."""
        return local_path(uri).exists()

    def list(self, prefix: str) -> list[str]:
        """Every file below the folder, sorted."""
        root = local_path(prefix)
        # A temp file is a write in flight (or one a killed process left): never part of the listing.
        return sorted(str(p) for p in root.rglob("*")
                      if p.is_file() and not p.name.startswith((TEMP_PREFIX, LOCK_PREFIX))) if root.is_dir() else []


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside path for read-compare-write sequences on local files."""
    guard = path.with_name(f"{LOCK_PREFIX}{path.name}")
    guard.parent.mkdir(parents=True, exist_ok=True)
    with open(guard, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
