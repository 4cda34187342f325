"""One interface for local paths / file:// and s3://bucket/key (boto3): the only module that knows buckets."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from captioning.errors import CaptioningError


class StorageError(CaptioningError):
    """A read or write of a local or object-storage URI failed."""


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage settings; anything unset comes from the standard AWS environment and config files."""

    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333 for SeaweedFS; AWS_ENDPOINT_URL also works
    region: str | None = None
    path_style: bool | None = None  # None: path-style addressing when an endpoint is given (most S3 clones)
    multipart_threshold: int = 64 * 1024 * 1024
    max_attempts: int = 10


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


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(uri, "expected s3://bucket/key")
    return parts.netloc, parts.path.lstrip("/")


class Storage:
    """Reads and writes bytes and files at local or s3:// URIs."""

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

            endpoint = self.config.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL")
            path_style = self.config.path_style if self.config.path_style is not None else bool(endpoint)
            self._client = boto3.client(
                "s3", endpoint_url=endpoint, region_name=self.config.region or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(retries={"mode": "adaptive", "max_attempts": self.config.max_attempts},
                              s3={"addressing_style": "path" if path_style else "auto"}),
            )
        return self._client

    def _transfer(self):  # noqa: ANN202
        from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

        return TransferConfig(multipart_threshold=self.config.multipart_threshold,
                              multipart_chunksize=max(self.config.multipart_threshold, 5 * 1024 * 1024))

    def read_bytes(self, uri: str) -> bytes:
        """The whole object or file."""
        if not is_s3(uri):
            try:
                return local_path(uri).read_bytes()
            except OSError as err:
                raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
        bucket, key = split_s3(uri)
        with self._errors(uri):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Write atomically (local: temp file then rename; S3: a single PUT is atomic)."""
        if not is_s3(uri):
            path = local_path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary(path)
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        bucket, key = split_s3(uri)
        with self._errors(uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type or _content_type(key))

    def upload_file(self, path: str | Path, uri: str, content_type: str | None = None) -> None:
        """Copy a local file to uri; multipart above the configured threshold."""
        if not is_s3(uri):
            target = local_path(uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary(target)
            shutil.copyfile(path, tmp)
            tmp.replace(target)
            return
        bucket, key = split_s3(uri)
        with self._errors(uri):
            self.client.upload_file(str(path), bucket, key, Config=self._transfer(),
                                    ExtraArgs={"ContentType": content_type or _content_type(key)})

    def download_file(self, uri: str, path: str | Path) -> Path:
        """Copy uri to a local file (written beside it, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._errors(uri):
                self.client.download_file(bucket, key, str(tmp), Config=self._transfer())
        else:
            try:
                shutil.copyfile(local_path(uri), tmp)
            except OSError as err:
                raise StorageError(uri, f"cannot read: {err.strerror}", "unreadable") from None
        tmp.replace(path)
        return path

    def exists(self, uri: str) -> bool:
        """Whether the object or file is there."""
        if not is_s3(uri):
            return local_path(uri).exists()
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(uri, _client_message(err)) from None

    def list(self, prefix: str) -> list[str]:
        """URIs of all files/objects under a prefix (a directory, or a key prefix ending in /)."""
        if not is_s3(prefix):
            root = local_path(prefix)
            # A temp file is a write in flight (or one a killed process left): never part of the listing.
            return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")) \
                if root.is_dir() else []
        bucket, key = split_s3(prefix)
        out = []
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
        return sorted(out)

    def upload_dir(self, folder: str | Path, prefix: str) -> None:
        """Copy every file below folder to prefix/<relative path>."""
        folder = Path(folder)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.upload_file(path, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")

    def local_dir(self, uri: str, cache: str | Path | None = None) -> Path:
        """A local directory with the contents of uri: the path itself, or a download of an S3 prefix."""
        if not is_s3(uri):
            return local_path(uri)
        prefix = uri.rstrip("/") + "/"
        target = Path(cache or tempfile.gettempdir()) / "captioning-s3" / hashlib.sha1(prefix.encode()).hexdigest()[:16]
        objects = self.list(prefix)
        if not objects:
            raise StorageError(uri, "no objects under this prefix", "not_found")
        for obj in objects:
            self.download_file(obj, target / obj[len(prefix):])
        return target

    def local_file(self, uri: str, cache: str | Path | None = None) -> Path:
        """A local path for uri: the path itself, or a download (keeping the file name and its suffixes)."""
        if not is_s3(uri):
            return local_path(uri)
        digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
        name = uri.rsplit("/", 1)[-1]
        return self.download_file(uri, Path(cache or tempfile.gettempdir()) / "captioning-s3" / digest / name)

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

        if err is None:
            return False
        if isinstance(err, ClientError):
            raise StorageError(self.uri, _client_message(err), _client_code(err)) from None
        if isinstance(err, S3UploadFailedError):
            raise StorageError(self.uri, f"upload failed: {str(err).split(': ', 1)[-1]}", "upload_failed") from None
        if isinstance(err, BotoCoreError):
            raise StorageError(self.uri, f"object storage error: {err}", "storage_error") from None
        return False


def _client_code(err) -> str:  # noqa: ANN001
    code = err.response.get("Error", {}).get("Code", "")
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


def _content_type(key: str) -> str:
    guessed, _ = mimetypes.guess_type(key)
    if key.endswith(".parquet"):
        return "application/vnd.apache.parquet"
    if key.endswith(".jsonl"):
        return "application/jsonl"
    return guessed or "application/octet-stream"


def _temporary(path: Path) -> Path:
    """A sibling temp name unique to this write: a retried task and its lost original may write at once."""
    return path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
