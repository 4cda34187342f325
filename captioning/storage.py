"""One interface for local paths / file:// and s3://bucket/key (boto3): the only module that knows buckets."""

from __future__ import annotations

import fcntl
import hashlib
import mimetypes
import os
import random
import shutil
import stat
import time
from contextlib import contextmanager
from datetime import timezone
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from captioning.atomic import LOCK_PREFIX, TEMP_PREFIX, atomic_path, atomic_write, fsync_folder, temporary_name
from captioning.config import StorageConfig
from captioning.errors import CaptioningError


class StorageError(CaptioningError):
    """A read or write of a local or object-storage URI failed."""


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


T = TypeVar("T")

# StorageError reasons worth waiting out: the server or the network, not the request.
TRANSIENT = frozenset({"unreachable", "throttled", "server_error", "upload_failed"})


class Storage:
    """Reads and writes bytes and files at local or s3:// URIs. Every S3 operation rides out transient trouble
    for config.retry_window seconds (then one StorageError, reason "unavailable"); permanent errors (access
    denied, no such bucket) fail at once."""

    def __init__(self, config: StorageConfig | None = None, client=None) -> None:  # noqa: ANN001
        """client: a ready boto3 S3 client (tests, launchers); by default one is built from config on first use."""
        self.config = config or StorageConfig()
        self._client = client

    @property
    def client(self):  # noqa: ANN201  (boto3 clients are generated classes)
        """The boto3 S3 client, created on first use so local-only runs never need AWS settings."""
        if self._client is None:
            import boto3  # noqa: PLC0415
            from botocore.config import Config  # noqa: PLC0415

            endpoint = self.endpoint
            path_style = self.config.path_style if self.config.path_style is not None else bool(endpoint)
            # Keys set in the environment now, explicitly: boto3's default session resolves credentials once per
            # process and would keep using the first ones it saw (a long-lived process whose settings change).
            keys = {"aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
                    "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
                    "aws_session_token": os.environ.get("AWS_SESSION_TOKEN")}
            keys = keys if keys["aws_access_key_id"] and keys["aws_secret_access_key"] else {}
            self._client = boto3.client(
                "s3", endpoint_url=endpoint, region_name=self.config.region or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(retries={"mode": "adaptive", "max_attempts": self.config.max_attempts},
                              s3={"addressing_style": "path" if path_style else "auto"}),
                **keys,
            )
        return self._client

    def patient(self, seconds: float) -> "Storage":
        """This storage (same client) with another retry window: a short one where waiting is pointless."""
        return Storage(replace(self.config, retry_window=seconds), self._client)

    def _call(self, uri: str, operation: Callable[[], T]) -> T:
        """operation(), retried with exponential backoff and jitter while it fails transiently, for at most
        the retry window; botocore errors become one StorageError naming uri."""
        started, attempt = None, 0
        while True:
            try:
                with self._errors(uri):
                    return operation()
            except StorageError as err:
                if err.reason not in TRANSIENT:
                    raise
                now = time.monotonic()
                started = now if started is None else started
                left = self.config.retry_window - (now - started)
                if left <= 0:
                    raise StorageError(self.endpoint or "object storage",
                                       f"no answer for {self.config.retry_window:.0f} s (the storage retry window) "
                                       f"while working on {uri}: {err.message}", "unavailable") from None
                delay = min(self.config.retry_cap, self.config.retry_base * 2 ** attempt) * random.uniform(0.5, 1.0)
                time.sleep(min(delay, left))
                attempt += 1

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint: the configured one, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS itself."""
        return self.config.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def arrow_location(self, uri: str):  # noqa: ANN201  (pyarrow.fs.FileSystem, imported lazily)
        """(path, pyarrow filesystem) for uri, with this storage's endpoint and the standard AWS credentials:
        what Ray Train's RunConfig(storage_path, storage_filesystem) takes."""
        import pyarrow.fs  # noqa: PLC0415

        if not is_s3(uri):
            return str(local_path(uri).resolve()), pyarrow.fs.LocalFileSystem()
        bucket, key = split_s3(uri)
        options = {"region": self.config.region or os.environ.get("AWS_REGION")
                   or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            options.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme or "https")
        # Ray Train's checkpoint uploads go through this filesystem: the AWS SDK's standard retries (backoff up to
        # 20 s), enough attempts to span about the same retry window as the rest of the storage calls.
        retries = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max(3, int(self.config.retry_window / 10)))
        return f"{bucket}/{key}".rstrip("/"), pyarrow.fs.S3FileSystem(retry_strategy=retries, **options)

    def _transfer(self):  # noqa: ANN202
        from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

        return TransferConfig(multipart_threshold=self.config.multipart_threshold,
                              multipart_chunksize=max(self.config.multipart_threshold, 5 * 1024 * 1024))

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object or file; with max_bytes, the size is checked before anything is read."""
        if not is_s3(uri):
            return _read_local(uri, max_bytes)
        bucket, key = split_s3(uri)

        def get() -> bytes:
            response = self.client.get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise StorageError(uri, f"object of {response['ContentLength']} bytes is over the {max_bytes} "
                                   "byte limit", "too_large")
            return response["Body"].read()

        return self._call(uri, get)

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Write atomically (local: synced temp file then rename; S3: a single PUT is atomic)."""
        if not is_s3(uri):
            try:
                atomic_write(local_path(uri), data)
            except OSError as err:
                raise StorageError(uri, f"cannot write: {err.strerror or err}", "unwritable") from None
            return
        bucket, key = split_s3(uri)
        self._call(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data,
                                                       ContentType=content_type or _content_type(key)))

    def read_tagged(self, uri: str) -> tuple[bytes, str] | None:
        """(content, version tag) of a small object or file, or None if absent: the input of replace_if."""
        stamped = self.read_stamped(uri)
        return None if stamped is None else (stamped[0], stamped[1])

    def read_stamped(self, uri: str) -> tuple[bytes, str, float] | None:
        """(content, version tag, age in seconds) or None if absent. The age is the time since the object was last
        written, on the storage's own clock (S3: the answer's Date less LastModified; a file: its mtime), so that
        hosts whose clocks disagree still agree on it."""
        if not is_s3(uri):
            path = local_path(uri)
            try:
                data = path.read_bytes()
                modified = path.stat().st_mtime
            except FileNotFoundError:
                return None
            except OSError as err:
                raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
            return data, hashlib.sha256(data).hexdigest(), max(0.0, time.time() - modified)
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError  # noqa: PLC0415

        def get() -> tuple[bytes, str, float] | None:
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if _client_code(err) == "not_found":
                    return None
                raise
            return response["Body"].read(), response["ETag"], _server_age(response)

        return self._call(uri, get)

    def age(self, uri: str) -> float | None:
        """Seconds since the object or file was last written, on the storage's own clock; None if absent."""
        if not is_s3(uri):
            try:
                return max(0.0, time.time() - local_path(uri).stat().st_mtime)
            except FileNotFoundError:
                return None
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError  # noqa: PLC0415

        def head() -> float | None:
            try:
                return _server_age(self.client.head_object(Bucket=bucket, Key=key))
            except ClientError as err:
                if _client_code(err) == "not_found":
                    return None
                raise

        return self._call(uri, head)

    def create(self, uri: str, data: bytes) -> str | None:
        """Write only if nothing is there yet (S3: If-None-Match: *); the new tag, or None if something was."""
        if not is_s3(uri):
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
        bucket, key = split_s3(uri)
        return self._conditional_put(uri, bucket, key, data, IfNoneMatch="*")

    def replace_if(self, uri: str, data: bytes, tag: str) -> str | None:
        """Overwrite only if the content still has this tag (S3: If-Match); the new tag, or None if it changed."""
        if not is_s3(uri):
            path = local_path(uri)
            with _locked(path):
                current = self.read_tagged(uri)
                if current is None or current[1] != tag:
                    return None
                atomic_write(path, data)
                return hashlib.sha256(data).hexdigest()
        bucket, key = split_s3(uri)
        return self._conditional_put(uri, bucket, key, data, IfMatch=tag)

    def delete(self, uri: str) -> None:
        """Remove a file or object; absent is fine."""
        if not is_s3(uri):
            local_path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        self._call(uri, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def delete_tree(self, prefix: str) -> None:
        """Remove a folder, or every object under a prefix; absent is fine."""
        if not is_s3(prefix):
            shutil.rmtree(local_path(prefix), ignore_errors=True)
            return
        for uri in self.list(prefix.rstrip("/") + "/"):
            self.delete(uri)

    def _conditional_put(self, uri: str, bucket: str, key: str, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        attempts = 0

        def put() -> str | None:
            nonlocal attempts
            attempts += 1
            try:
                response = self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=_content_type(key),
                                                  **condition)
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return None  # someone else wrote first: the answer, not an error
                raise
            return response["ETag"]

        tag = self._call(uri, put)
        if tag is None and attempts > 1:
            # A retried write whose first try landed but whose answer was lost now fails its own condition:
            # if the object holds exactly our bytes, the write was ours.
            current = self.read_tagged(uri)
            if current is not None and current[0] == data:
                return current[1]
        return tag

    def check_writable(self, prefix: str) -> None:
        """Write and delete a probe under prefix: a run fails on credentials or a missing bucket before its work,
        not after it."""
        if not is_s3(prefix):
            try:
                local_path(prefix).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(prefix, f"cannot create this folder: {err.strerror or err}", "unwritable") \
                    from None
            return
        probe = f"{prefix.rstrip('/')}/.write-probe-{os.getpid()}"
        try:
            self.write_bytes(probe, b"")
            self.delete(probe)
        except StorageError as err:
            raise StorageError(prefix, f"cannot write here: {err.message}", err.reason) from None

    def describe(self, uri: str) -> dict[str, int | str]:
        """Size and a content fingerprint (local: sha256; S3: the ETag), to tell whether a file changed."""
        if not is_s3(uri):
            path = local_path(uri)
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
            except OSError as err:
                raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
            return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
        bucket, key = split_s3(uri)
        head = self._call(uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
        return {"bytes": head["ContentLength"], "etag": head["ETag"]}

    def upload_file(self, path: str | Path, uri: str, content_type: str | None = None) -> None:
        """Copy a local file to uri; multipart above the configured threshold."""
        if not is_s3(uri):
            with atomic_path(local_path(uri)) as tmp:
                shutil.copyfile(path, tmp)
            return
        bucket, key = split_s3(uri)
        self._call(uri, lambda: self.client.upload_file(str(path), bucket, key, Config=self._transfer(),
                                                        ExtraArgs={"ContentType": content_type or _content_type(key)}))

    def download_file(self, uri: str, path: str | Path) -> Path:
        """Copy uri to a local file (written beside it, then renamed)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            if is_s3(uri):
                bucket, key = split_s3(uri)
                self._call(uri, lambda: self.client.download_file(bucket, key, str(tmp), Config=self._transfer()))
            else:
                try:
                    shutil.copyfile(local_path(uri), tmp)
                except OSError as err:
                    raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
        return path

    def exists(self, uri: str) -> bool:
        """Whether the object or file is there."""
        if not is_s3(uri):
            return local_path(uri).exists()
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError  # noqa: PLC0415

        def head() -> bool:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call(uri, head)

    def list(self, prefix: str) -> list[str]:
        """URIs of all files/objects under a prefix (a directory, or a key prefix ending in /)."""
        if not is_s3(prefix):
            root = local_path(prefix)
            # A temp file is a write in flight (or one a killed process left): never part of the listing.
            return sorted(str(p) for p in root.rglob("*")
                          if p.is_file() and not p.name.startswith((TEMP_PREFIX, LOCK_PREFIX))) \
                if root.is_dir() else []
        bucket, key = split_s3(prefix)

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return sorted(f"s3://{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", []))

        return self._call(prefix, listing)

    def upload_dir(self, folder: str | Path, prefix: str, last: str | None = None) -> None:
        """Copy every file below folder to prefix/<relative path>; `last` (a relative path) goes after all the
        others, so that its presence says the copy is complete (a bundle's bundle.json)."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != last)
        for path in files + ([folder / last] if last else []):
            self.upload_file(path, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")

    def local_dir(self, uri: str, cache: str | Path | None = None) -> Path:
        """A local directory with the contents of uri: the path itself, or a download of an S3 prefix."""
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
        """A local path for uri: the path itself, or a download (keeping the file name and its suffixes)."""
        if not is_s3(uri):
            return local_path(uri)
        digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
        name = uri.rsplit("/", 1)[-1]
        folder = Path(cache or cache_dir() / "s3") / digest
        return self.download_file(uri, inside(folder, name or "object", uri))

    def _errors(self, uri: str):  # noqa: ANN202
        return _S3Errors(uri)


class _S3Errors:
    """Turns botocore failures into one StorageError line naming the URI (never the credentials)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:  # noqa: ANN001
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415
        from boto3.exceptions import S3UploadFailedError  # noqa: PLC0415

        from botocore.exceptions import (ConnectionError as BotoConnectionError,  # noqa: PLC0415
                                         HTTPClientError, IncompleteReadError, ResponseStreamingError)
        from urllib3.exceptions import HTTPError as Urllib3Error  # noqa: PLC0415

        if err is None:
            return False
        if isinstance(err, ClientError):
            raise StorageError(self.uri, _client_message(err), _client_code(err)) from None
        if isinstance(err, S3UploadFailedError):
            # boto3 wraps the part's own error: AccessDenied must fail at once, SlowDown or a 5xx is waited out.
            cause = err.__cause__ or err.__context__
            reason = _client_code(cause) if isinstance(cause, ClientError) else "upload_failed"
            raise StorageError(self.uri, f"upload failed: {str(err).split(': ', 1)[-1]}", reason) from None
        if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
                            Urllib3Error, ConnectionError, TimeoutError)):
            # Refused, reset, closed before an answer (ConnectionClosedError is an HTTPClientError), timed out,
            # or cut off mid-body: the network or the server, worth waiting out.
            raise StorageError(self.uri, f"object storage unreachable: {err}", "unreachable") from None
        if isinstance(err, BotoCoreError):
            raise StorageError(self.uri, f"object storage error: {err}", "storage_error") from None
        return False


THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
             "RequestThrottled", "429"}
SERVER_ERRORS = {"InternalError", "ServiceUnavailable", "RequestTimeout", "500", "502", "503", "504"}


def _client_code(err) -> str:  # noqa: ANN001
    code = err.response.get("Error", {}).get("Code", "")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in THROTTLED:
        return "throttled"
    if code in SERVER_ERRORS or status >= 500:
        return "server_error"
    return {"NoSuchKey": "not_found", "404": "not_found", "NoSuchBucket": "not_found",
            "AccessDenied": "access_denied", "SignatureDoesNotMatch": "access_denied",
            "InvalidAccessKeyId": "access_denied", "403": "access_denied"}.get(code, "storage_error")


def _client_message(err) -> str:  # noqa: ANN001
    code = err.response.get("Error", {}).get("Code", "error")
    reason = _client_code(err)
    if reason == "not_found":
        return f"not found ({code})"
    if reason == "access_denied":
        return f"access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint"
    return f"{code}: {err.response.get('Error', {}).get('Message', '')}".strip()


def _server_age(response: dict) -> float:
    """An S3 answer's age of its object: the server's Date header less LastModified (one clock, the server's)."""
    from email.utils import parsedate_to_datetime  # noqa: PLC0415

    modified = response.get("LastModified")
    if modified is None:  # an S3 that does not say: taken as just written (a lease then stays live: fail closed)
        return 0.0
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
    try:
        served = parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError):
        served = None
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=timezone.utc)
    if served is not None and served.tzinfo is None:  # "-0000": UTC, said without an offset
        served = served.replace(tzinfo=timezone.utc)
    if served is None:  # no Date header: this host's clock is all there is
        return max(0.0, time.time() - modified.timestamp())
    return max(0.0, (served - modified).total_seconds())


def _content_type(key: str) -> str:
    guessed, _ = mimetypes.guess_type(key)
    if key.endswith(".parquet"):
        return "application/vnd.apache.parquet"
    if key.endswith(".jsonl"):
        return "application/jsonl"
    return guessed or "application/octet-stream"


def _read_local(uri: str, max_bytes: int | None) -> bytes:
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
            raise StorageError(uri, f"file of {info.st_size} bytes is over the {max_bytes} byte limit", "too_large")
        data = file.read() if max_bytes is None else file.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the check
        raise StorageError(uri, f"file is over the {max_bytes} byte limit", "too_large")
    return data


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
