"""One interface for local paths / file:// and s3://bucket/key: Storage picks the backend a URI names (local.py,
s3.py, behind one Backend shape); the only package that knows buckets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from captioning.atomic import atomic_path  # noqa: F401  (callers take it from here with the rest of storage)
from captioning.config import StorageConfig
from captioning.errors import CaptioningError


class StorageError(CaptioningError):
    """A read or write of a local or object-storage URI failed."""


# StorageError reasons worth waiting out: the server or the network, not the request.
TRANSIENT = frozenset({"unreachable", "throttled", "server_error", "upload_failed"})


def is_s3(uri: str) -> bool:
    """True for s3://bucket/key URIs."""
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    """A local path from a plain path or a file:// URI."""
    return Path(urlsplit(uri).path) if uri.startswith("file://") else Path(uri)


def absolute(uri: str) -> str:
    """s3:// and URLs as they are; a local path or file:// URI as an absolute path (workers have other cwds)."""
    if is_s3(uri) or ("://" in uri and not uri.startswith("file://")):
        return uri
    return str(local_path(uri).resolve())


def cache_dir() -> Path:
    """This user's private cache folder (0700): never a predictable shared path in /tmp."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioning"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    base.chmod(0o700)
    return base


def inside(folder: Path, relative: str, source: str) -> Path:
    """folder/relative, refused when it would resolve outside folder (../ in a key or a name)."""
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise StorageError(source, f"{relative!r} would land outside {folder}", "unsafe_path")
    return target


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(uri, "expected s3://bucket/key")
    return parts.netloc, parts.path.lstrip("/")


class Backend(Protocol):
    """What each kind of location does; Storage gives every call to the backend its URI names."""

    def read_bytes(self, uri: str, max_bytes: int | None) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes, content_type: str | None) -> None: ...
    def read_stamped(self, uri: str) -> tuple[bytes, str, float] | None: ...
    def age(self, uri: str) -> float | None: ...
    def create(self, uri: str, data: bytes) -> str | None: ...
    def replace_if(self, uri: str, data: bytes, tag: str) -> str | None: ...
    def delete(self, uri: str) -> None: ...
    def delete_tree(self, prefix: str) -> None: ...
    def check_writable(self, prefix: str) -> None: ...
    def describe(self, uri: str) -> dict[str, int | str]: ...
    def upload_file(self, path: Path, uri: str, content_type: str | None) -> None: ...
    def download_file(self, uri: str, path: Path) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...


class Storage:
    """Reads and writes bytes and files at local or s3:// URIs. Every S3 operation rides out transient trouble
    for config.retry_window seconds (then one StorageError, reason "unavailable"); permanent errors (access
    denied, no such bucket) fail at once."""

    def __init__(self, config: StorageConfig | None = None, client: Any = None) -> None:
        """client: a ready boto3 S3 client (tests, launchers); by default one is built from config on first use."""
        from captioning.storage.local import LocalBackend  # noqa: PLC0415
        from captioning.storage.s3 import S3Backend  # noqa: PLC0415

        self.config = config or StorageConfig()
        self._local = LocalBackend()
        self._s3 = S3Backend(self.config, client)

    def _at(self, uri: str) -> Backend:
        return self._s3 if is_s3(uri) else self._local

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use so local-only runs never need AWS settings."""
        return self._s3.client

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint: the configured one, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS itself."""
        return self._s3.endpoint

    def patient(self, seconds: float) -> "Storage":
        """This storage (same client) with another retry window: a short one where waiting is pointless."""
        from dataclasses import replace  # noqa: PLC0415

        return Storage(replace(self.config, retry_window=seconds), self._s3.built_client)

    def arrow_location(self, uri: str) -> tuple[str, Any]:
        """(path, pyarrow filesystem) for uri, with this storage's endpoint and the standard AWS credentials:
        what Ray Train's RunConfig(storage_path, storage_filesystem) takes."""
        if is_s3(uri):
            return self._s3.arrow_location(uri)
        import pyarrow.fs  # noqa: PLC0415

        return str(local_path(uri).resolve()), pyarrow.fs.LocalFileSystem()

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object or file; with max_bytes, the size is checked before anything is read."""
        return self._at(uri).read_bytes(uri, max_bytes)

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Write atomically (local: synced temp file then rename; S3: a single PUT is atomic)."""
        self._at(uri).write_bytes(uri, data, content_type)

    def read_tagged(self, uri: str) -> tuple[bytes, str] | None:
        """(content, version tag) of a small object or file, or None if absent: the input of replace_if."""
        stamped = self.read_stamped(uri)
        return None if stamped is None else (stamped[0], stamped[1])

    def read_stamped(self, uri: str) -> tuple[bytes, str, float] | None:
        """(content, version tag, age in seconds) or None if absent. The age is the time since the object was last
        written, on the storage's own clock (S3: the answer's Date less LastModified; a file: its mtime), so that
        hosts whose clocks disagree still agree on it."""
        return self._at(uri).read_stamped(uri)

    def age(self, uri: str) -> float | None:
        """Seconds since the object or file was last written, on the storage's own clock; None if absent."""
        return self._at(uri).age(uri)

    def create(self, uri: str, data: bytes) -> str | None:
        """Write only if nothing is there yet (S3: If-None-Match: *); the new tag, or None if something was."""
        return self._at(uri).create(uri, data)

    def replace_if(self, uri: str, data: bytes, tag: str) -> str | None:
        """Overwrite only if the content still has this tag (S3: If-Match); the new tag, or None if it changed."""
        return self._at(uri).replace_if(uri, data, tag)

    def delete(self, uri: str) -> None:
        """Remove a file or object; absent is fine."""
        self._at(uri).delete(uri)

    def delete_tree(self, prefix: str) -> None:
        """Remove a folder, or every object under a prefix; absent is fine."""
        self._at(prefix).delete_tree(prefix)

    def check_writable(self, prefix: str) -> None:
        """A run fails on credentials or a missing bucket (or an uncreatable folder) before its work, not after."""
        self._at(prefix).check_writable(prefix)

    def describe(self, uri: str) -> dict[str, int | str]:
        """Size and a content fingerprint (local: sha256; S3: the ETag), to tell whether a file changed."""
        return self._at(uri).describe(uri)

    def upload_file(self, path: str | Path, uri: str, content_type: str | None = None) -> None:
        """Copy a local file to uri; multipart above the configured threshold."""
        self._at(uri).upload_file(Path(path), uri, content_type)

    def download_file(self, uri: str, path: str | Path) -> Path:
        """Copy uri to a local file (written beside it, then renamed)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self._at(uri).download_file(uri, tmp)
        return path

    def exists(self, uri: str) -> bool:
        """Whether the object or file is there."""
        return self._at(uri).exists(uri)

    def list(self, prefix: str) -> list[str]:
        """URIs of all files/objects under a prefix (a directory, or a key prefix ending in /)."""
        return self._at(prefix).list(prefix)

    def upload_dir(self, folder: str | Path, prefix: str, last: str | None = None) -> None:
        """Copy every file below folder to prefix/<relative path>; `last` (a relative path) goes after all the
        others, so that its presence says the copy is complete (a bundle's bundle.json)."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != last)
        for path in files + ([folder / last] if last else []):
            self.upload_file(path, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")

    def local_dir(self, uri: str, cache: str | Path | None = None) -> Path:
        """A local directory with the contents of uri: the path itself, or a download of an S3 prefix into the
        private cache."""
        if not is_s3(uri):
            return local_path(uri)
        prefix = uri.rstrip("/") + "/"
        target = Path(cache or cache_dir() / "s3") / hashlib.sha1(prefix.encode()).hexdigest()[:16]
        # Keys ending in / are folder markers some tools create: nothing to download.
        objects = [obj for obj in self.list(prefix) if not obj.endswith("/")]
        if not objects:
            raise StorageError(uri, "no objects under this prefix", "not_found")
        for obj in objects:
            self.download_file(obj, inside(target, obj[len(prefix):], obj))
        return target

    def local_file(self, uri: str, cache: str | Path | None = None) -> Path:
        """A local path for uri: the path itself, or a download into the private cache (keeping the file name and
        its suffixes)."""
        if not is_s3(uri):
            return local_path(uri)
        folder = Path(cache or cache_dir() / "s3") / hashlib.sha1(uri.encode()).hexdigest()[:16]
        return self.download_file(uri, inside(folder, uri.rsplit("/", 1)[-1] or "object", uri))
