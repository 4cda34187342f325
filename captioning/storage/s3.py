"""s3://bucket/key through boto3: one retry policy (tenacity, for the configured window; botocore's own retries
are off, so the two never stack), one place for S3 error codes, conditional create/replace by If-None-Match and
If-Match (neither pyarrow.fs nor fsspec offers them)."""

from __future__ import annotations

import mimetypes
import os
import random
import time
from datetime import timezone
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from captioning.config import StorageConfig
from captioning.storage import TRANSIENT, StorageError, split_s3

T = TypeVar("T")

THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
             "RequestThrottled", "429"}
SERVER_ERRORS = {"InternalError", "ServiceUnavailable", "RequestTimeout", "500", "502", "503", "504"}
CODES = {"NoSuchKey": "not_found", "404": "not_found", "NotFound": "not_found", "NoSuchBucket": "not_found",
         "AccessDenied": "access_denied", "SignatureDoesNotMatch": "access_denied",
         "InvalidAccessKeyId": "access_denied", "403": "access_denied"}
CONFLICTS = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}  # a condition not met: an answer


class S3Backend:
    """Objects in S3-compatible storage; every call rides out transient trouble for config.retry_window."""

    def __init__(self, config: StorageConfig, client: Any = None) -> None:
        self.config = config
        self._client = client

    @property
    def built_client(self) -> Any:
        """The client if one was given or has been built, else None (nothing is built to answer)."""
        return self._client

    @property
    def client(self) -> Any:
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
                "s3", endpoint_url=endpoint, region_name=self.region,
                # One attempt per call: the retry window below is the one retry policy.
                config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                              s3={"addressing_style": "path" if path_style else "auto"}),
                **keys,
            )
        return self._client

    @property
    def endpoint(self) -> str | None:
        """The configured endpoint, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS itself."""
        return self.config.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def region(self) -> str:
        """The configured region, else AWS_REGION or AWS_DEFAULT_REGION, else us-east-1."""
        return (self.config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                or "us-east-1")

    def call(self, uri: str, operation: Callable[[], T]) -> T:
        """operation(), retried with exponential backoff and jitter while it fails transiently, for at most the
        retry window; botocore errors become one StorageError naming uri."""
        from tenacity import Retrying, retry_if_exception, stop_after_delay  # noqa: PLC0415

        window = self.config.retry_window

        def wait(state: Any) -> float:
            delay = min(self.config.retry_cap, self.config.retry_base * 2 ** (state.attempt_number - 1))
            return max(0.0, min(delay * random.uniform(0.5, 1.0), window - state.seconds_since_start))

        def give_up(state: Any) -> T:
            err = state.outcome.exception()
            raise StorageError(self.endpoint or "object storage",
                               f"no answer for {window:.0f} s (the storage retry window) while working on {uri}: "
                               f"{err.message}", "unavailable") from None

        def attempt() -> T:
            try:
                return operation()
            except Exception as err:  # noqa: BLE001  (only botocore's and the network's are translated)
                raise storage_error(uri, err) from None

        retrying = Retrying(retry=retry_if_exception(lambda e: isinstance(e, StorageError) and e.reason in TRANSIENT),
                            stop=stop_after_delay(window), wait=wait, retry_error_callback=give_up)
        return retrying(attempt)

    def _absent_is_none(self, uri: str, operation: Callable[[], T]) -> T | None:
        """operation() through call(), with "no such object" answered as None."""
        from botocore.exceptions import ClientError  # noqa: PLC0415

        def guarded() -> T | None:
            try:
                return operation()
            except ClientError as err:
                if client_code(err) == "not_found":
                    return None
                raise

        return self.call(uri, guarded)

    def arrow_location(self, uri: str) -> tuple[str, Any]:
        """(bucket/key, pyarrow S3FileSystem) with this endpoint and region."""
        import pyarrow.fs  # noqa: PLC0415

        bucket, key = split_s3(uri)
        options: dict[str, Any] = {"region": self.region}
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            options.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme or "https")
        # Ray Train's checkpoint uploads go through this filesystem: the AWS SDK's standard retries (backoff up to
        # 20 s), enough attempts to span about the same retry window as the rest of the storage calls.
        retries = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max(3, int(self.config.retry_window / 10)))
        return f"{bucket}/{key}".rstrip("/"), pyarrow.fs.S3FileSystem(retry_strategy=retries, **options)

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

        return TransferConfig(multipart_threshold=self.config.multipart_threshold,
                              multipart_chunksize=max(self.config.multipart_threshold, 5 * 1024 * 1024))

    def read_bytes(self, uri: str, max_bytes: int | None) -> bytes:
        """The object, its size checked from the answer's headers before the body is read."""
        bucket, key = split_s3(uri)

        def get() -> bytes:
            response = self.client.get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise StorageError(uri, f"object of {response['ContentLength']} bytes is over the {max_bytes} "
                                   "byte limit", "too_large")
            return response["Body"].read()

        return self.call(uri, get)

    def write_bytes(self, uri: str, data: bytes, content_type: str | None) -> None:
        """One PUT (atomic)."""
        bucket, key = split_s3(uri)
        self.call(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data,
                                                      ContentType=content_type or content_type_of(key)))

    def read_stamped(self, uri: str) -> tuple[bytes, str, float] | None:
        """(content, ETag, the server's Date less LastModified) or None."""
        bucket, key = split_s3(uri)

        def get() -> tuple[bytes, str, float]:
            response = self.client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), response["ETag"], server_age(response)

        return self._absent_is_none(uri, get)

    def age(self, uri: str) -> float | None:
        """The object's age on the server's clock; None if absent."""
        bucket, key = split_s3(uri)
        return self._absent_is_none(uri, lambda: server_age(self.client.head_object(Bucket=bucket, Key=key)))

    def create(self, uri: str, data: bytes) -> str | None:
        """PUT with If-None-Match: *."""
        return self._conditional_put(uri, data, IfNoneMatch="*")

    def replace_if(self, uri: str, data: bytes, tag: str) -> str | None:
        """PUT with If-Match: tag."""
        return self._conditional_put(uri, data, IfMatch=tag)

    def _conditional_put(self, uri: str, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        bucket, key = split_s3(uri)
        attempts = 0

        def put() -> str | None:
            nonlocal attempts
            attempts += 1
            try:
                response = self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type_of(key),
                                                  **condition)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code", "") in CONFLICTS:
                    return None  # someone else wrote first: the answer, not an error
                raise
            return response["ETag"]

        tag = self.call(uri, put)
        if tag is None and attempts > 1:
            # A retried write whose first try landed but whose answer was lost now fails its own condition:
            # if the object holds exactly our bytes, the write was ours.
            current = self.read_stamped(uri)
            if current is not None and current[0] == data:
                return current[1]
        return tag

    def delete(self, uri: str) -> None:
        """DELETE; absent is fine."""
        bucket, key = split_s3(uri)
        self.call(uri, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def delete_tree(self, prefix: str) -> None:
        """Every object under the prefix."""
        for uri in self.list(prefix.rstrip("/") + "/"):
            self.delete(uri)

    def check_writable(self, prefix: str) -> None:
        """Write and delete a probe under prefix."""
        probe = f"{prefix.rstrip('/')}/.write-probe-{os.getpid()}"
        try:
            self.write_bytes(probe, b"", None)
            self.delete(probe)
        except StorageError as err:
            raise StorageError(prefix, f"cannot write here: {err.message}", err.reason) from None

    def describe(self, uri: str) -> dict[str, int | str]:
        """Size and ETag."""
        bucket, key = split_s3(uri)
        head = self.call(uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
        return {"bytes": head["ContentLength"], "etag": head["ETag"]}

    def upload_file(self, path: Path, uri: str, content_type: str | None) -> None:
        """boto3's managed upload: multipart above the configured threshold."""
        bucket, key = split_s3(uri)
        self.call(uri, lambda: self.client.upload_file(str(path), bucket, key, Config=self._transfer(),
                                                       ExtraArgs={"ContentType": content_type or content_type_of(key)}))

    def download_file(self, uri: str, path: Path) -> None:
        """boto3's managed download to path."""
        bucket, key = split_s3(uri)
        self.call(uri, lambda: self.client.download_file(bucket, key, str(path), Config=self._transfer()))

    def exists(self, uri: str) -> bool:
        """HEAD the object."""
        bucket, key = split_s3(uri)
        return self._absent_is_none(uri, lambda: self.client.head_object(Bucket=bucket, Key=key)) is not None

    def list(self, prefix: str) -> list[str]:
        """Every key under the prefix, sorted."""
        bucket, key = split_s3(prefix)

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return sorted(f"s3://{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", []))

        return self.call(prefix, listing)


def storage_error(uri: str, err: BaseException) -> BaseException:
    """A botocore or network failure as one StorageError line naming the URI (never the credentials); anything
    else (ours included) as it is."""
    from boto3.exceptions import S3UploadFailedError  # noqa: PLC0415
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415
    from botocore.exceptions import ConnectionError as BotoConnectionError  # noqa: PLC0415
    from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError  # noqa: PLC0415
    from urllib3.exceptions import HTTPError as Urllib3Error  # noqa: PLC0415

    if isinstance(err, ClientError):
        return StorageError(uri, client_message(err), client_code(err))
    if isinstance(err, S3UploadFailedError):
        # boto3 wraps the part's own error: AccessDenied must fail at once, SlowDown or a 5xx is waited out.
        cause = err.__cause__ or err.__context__
        reason = client_code(cause) if isinstance(cause, ClientError) else "upload_failed"
        return StorageError(uri, f"upload failed: {str(err).split(': ', 1)[-1]}", reason)
    if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
                        Urllib3Error, ConnectionError, TimeoutError)):
        # Refused, reset, closed before an answer (ConnectionClosedError is an HTTPClientError), timed out,
        # or cut off mid-body: the network or the server, worth waiting out.
        return StorageError(uri, f"object storage unreachable: {err}", "unreachable")
    if isinstance(err, BotoCoreError):
        return StorageError(uri, f"object storage error: {err}", "storage_error")
    return err


def client_code(err: Any) -> str:
    """The reason code of an S3 error answer: throttled, server_error, not_found, access_denied, storage_error."""
    code = err.response.get("Error", {}).get("Code", "")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in THROTTLED:
        return "throttled"
    if code in SERVER_ERRORS or status >= 500:
        return "server_error"
    return CODES.get(code, "storage_error")


def client_message(err: Any) -> str:
    """An S3 error answer in one line."""
    code = err.response.get("Error", {}).get("Code", "error")
    reason = client_code(err)
    if reason == "not_found":
        return f"not found ({code})"
    if reason == "access_denied":
        return f"access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint"
    return f"{code}: {err.response.get('Error', {}).get('Message', '')}".strip()


def server_age(response: dict) -> float:
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


def content_type_of(key: str) -> str:
    """The Content-Type an object is written with, from its key."""
    guessed, _ = mimetypes.guess_type(key)
    if key.endswith(".parquet"):
        return "application/vnd.apache.parquet"
    if key.endswith(".jsonl"):
        return "application/jsonl"
    return guessed or "application/octet-stream"
