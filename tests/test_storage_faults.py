"""Object storage that misbehaves: throttling, dropped connections and outages are ridden out for the retry
window (backoff with jitter), permanent errors fail at once; through a fault-injecting proxy in front of the real
server (SeaweedFS), and with injected failures where the control flow is what is under test."""

import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from captioning.config import StorageConfig
from captioning.storage import Storage, StorageError
from tests.faults import FaultProxy


def client_error(code, status):
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


class Flaky:
    """A stand-in S3 client whose put_object fails as scripted, then stores."""

    def __init__(self, failures):
        self.failures, self.calls, self.stored = list(failures), 0, {}

    def put_object(self, Bucket, Key, Body, ContentType, **condition):  # noqa: N803  (boto3's names)
        self.calls += 1
        if condition.get("IfNoneMatch") == "*" and Key in self.stored:
            raise client_error("PreconditionFailed", 412)
        failure = self.failures.pop(0) if self.failures else None
        if failure == "lost":  # the write lands, its answer does not
            self.stored[Key] = Body
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        if failure:
            raise failure
        self.stored[Key] = Body
        return {"ETag": f'"{len(Body)}"'}

    def get_object(self, Bucket, Key):  # noqa: N803
        import io

        return {"Body": io.BytesIO(self.stored[Key]), "ETag": f'"{len(self.stored[Key])}"', "ContentLength": 1}


def patient(client, window=5.0):
    return Storage(StorageConfig(s3_endpoint="http://127.0.0.1:1", retry_window=window, retry_base=0.01,
                                 retry_cap=0.05), client=client)


def test_throttling_server_errors_and_lost_connections_are_retried_until_they_pass():
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    client = Flaky([client_error("SlowDown", 503), client_error("InternalError", 500),
                    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                    # A connection closed before any answer (a dropped connection, as the fault proxy makes) and a
                    # read that timed out: botocore's HTTPClientError kin, not its ConnectionError.
                    ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
                    ReadTimeoutError(endpoint_url="http://127.0.0.1:1")])
    patient(client).write_bytes("s3://b/k", b"data")
    assert client.calls == 6 and client.stored["k"] == b"data"


@pytest.mark.parametrize("code,status", [("AccessDenied", 403), ("InvalidAccessKeyId", 403), ("NoSuchBucket", 404)])
def test_permanent_errors_fail_at_once(code, status):
    client = Flaky([client_error(code, status)] * 5)
    began = time.monotonic()
    with pytest.raises(StorageError) as failed:
        patient(client, window=60).write_bytes("s3://b/k", b"data")
    assert client.calls == 1 and time.monotonic() - began < 1
    assert failed.value.source == "s3://b/k" and code in failed.value.message


def test_past_the_window_one_error_names_the_endpoint_and_the_window():
    client = Flaky([EndpointConnectionError(endpoint_url="http://127.0.0.1:1")] * 1000)
    began = time.monotonic()
    with pytest.raises(StorageError) as failed:
        patient(client, window=1.0).write_bytes("s3://b/k", b"data")
    assert 1.0 <= time.monotonic() - began < 3 and client.calls > 3
    assert failed.value.reason == "unavailable" and failed.value.source == "http://127.0.0.1:1"
    assert failed.value.message.startswith("no answer for 1 s (the storage retry window) while working on s3://b/k")


def test_a_conditional_create_whose_answer_was_lost_is_still_ours():
    # The first try lands but the connection drops before the answer; the retry then fails its If-None-Match.
    client = Flaky(["lost"])
    assert patient(client).create("s3://b/marker", b"mine") is not None
    other = Flaky([])
    other.stored["marker"] = b"someone else's"
    assert patient(other).create("s3://b/marker", b"mine") is None  # a real conflict stays one


def test_the_real_server_behind_throttling_and_dropped_connections_loses_and_duplicates_nothing(seaweed, tmp_path,
                                                                                                 monkeypatch):
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    proxy = FaultProxy(seaweed.endpoint, slowdown=0.15, drop=0.10, seed=3)
    try:
        storage = Storage(StorageConfig(s3_endpoint=proxy.endpoint, retry_window=60, retry_base=0.02, retry_cap=0.2))
        for i in range(15):
            storage.write_bytes(f"s3://outputs/faults/{i}.txt", f"row {i}".encode())
            assert storage.create(f"s3://outputs/faults/{i}.marker", f"{i}".encode()) is not None
        (tmp_path / "big.bin").write_bytes(b"x" * 300_000)
        storage.upload_file(tmp_path / "big.bin", "s3://outputs/faults/big.bin")
        listed = storage.list("s3://outputs/faults/")
        assert len(listed) == 31
        assert [storage.read_bytes(f"s3://outputs/faults/{i}.txt") for i in range(15)] == \
            [f"row {i}".encode() for i in range(15)]
        assert proxy.counts["slowdown"] >= 3 and proxy.counts["dropped"] >= 3, proxy.counts
    finally:
        proxy.close()


def test_an_outage_shorter_than_the_window_is_waited_out(seaweed, monkeypatch):
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    proxy = FaultProxy(seaweed.endpoint)
    try:
        storage = Storage(StorageConfig(s3_endpoint=proxy.endpoint, retry_window=30, retry_base=0.2, retry_cap=1))
        storage.write_bytes("s3://outputs/outage/before", b"1")
        proxy.outage(3.0)
        began = time.monotonic()
        storage.write_bytes("s3://outputs/outage/during", b"2")  # refused for 3 s, then it lands
        assert time.monotonic() - began >= 2.5
        assert storage.read_bytes("s3://outputs/outage/during") == b"2"
    finally:
        proxy.close()


def test_a_multipart_upload_refused_for_good_fails_at_once_and_a_throttled_one_is_retried(tmp_path):
    from boto3.exceptions import S3UploadFailedError

    class Uploads:
        def __init__(self, code, status, failures):
            self.code, self.status, self.failures, self.calls = code, status, failures, 0

        def upload_file(self, *args, **kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                try:
                    raise client_error(self.code, self.status)
                except ClientError as err:
                    raise S3UploadFailedError(f"Failed to upload x: {err}")  # boto3's way: the cause is context

    (tmp_path / "f").write_bytes(b"x")
    denied = Uploads("AccessDenied", 403, 5)
    with pytest.raises(StorageError, match="upload failed"):
        patient(denied, window=60).upload_file(tmp_path / "f", "s3://b/k")
    assert denied.calls == 1
    throttled = Uploads("SlowDown", 503, 2)
    patient(throttled).upload_file(tmp_path / "f", "s3://b/k")
    assert throttled.calls == 3
