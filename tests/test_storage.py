"""The storage layer against a real S3-compatible server (SeaweedFS) started by the tests, and locally."""

import os
from pathlib import Path

import pytest

from captioning.bundle import load_bundle
from captioning.manifest import read_manifest
from ops.seaweed import PORT_FLAGS, RAY_WORKER_PORTS
from captioning.storage import Storage, StorageError


@pytest.fixture
def s3(seaweed):
    return Storage(client=seaweed.client())


def test_every_port_is_explicit_and_outside_rays_range(seaweed):
    assert set(seaweed.ports) == set(PORT_FLAGS)
    assert not any(port in RAY_WORKER_PORTS for port in seaweed.ports.values())
    args = " ".join(seaweed.process.args)
    assert all(f"-{flag}={port}" in args for flag, port in seaweed.ports.items())
    assert seaweed.secret_key not in args  # the secret goes by environment, not the command line


def test_round_trip_content_type_and_listing(s3, seaweed):
    s3.write_bytes("s3://captions/a/x.json", b'{"k": 1}')
    s3.write_bytes("s3://captions/a/b/y.bin", b"\x00\x01", content_type="application/x-test")
    assert s3.read_bytes("s3://captions/a/x.json") == b'{"k": 1}'
    head = seaweed.client().head_object(Bucket="captions", Key="a/x.json")
    assert head["ContentType"] == "application/json"
    assert seaweed.client().head_object(Bucket="captions", Key="a/b/y.bin")["ContentType"] == "application/x-test"
    assert s3.list("s3://captions/a/") == ["s3://captions/a/b/y.bin", "s3://captions/a/x.json"]
    assert s3.exists("s3://captions/a/x.json") and not s3.exists("s3://captions/a/nope")


def test_multipart_upload_above_the_threshold(seaweed, tmp_path):
    from captioning.storage import StorageConfig

    storage = Storage(StorageConfig(multipart_threshold=5 * 1024 * 1024), client=seaweed.client())
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    storage.upload_file(tmp_path / "big.bin", "s3://captions/big.bin")
    head = seaweed.client().head_object(Bucket="captions", Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB, 5 MiB and 1 MiB
    assert storage.download_file("s3://captions/big.bin", tmp_path / "back.bin").read_bytes() == data


def test_wrong_secret_is_refused(seaweed):
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
                          aws_access_key_id=seaweed.access_key, aws_secret_access_key="not-the-secret",
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(StorageError) as err:
        Storage(client=client).write_bytes("s3://captions/intruder", b"x")
    assert err.value.reason == "access_denied" and "not-the-secret" not in str(err.value)
    assert not Storage(client=seaweed.client()).exists("s3://captions/intruder")


def test_missing_object_names_the_uri(s3):
    with pytest.raises(StorageError, match="s3://captions/none.txt: not found"):
        s3.read_bytes("s3://captions/none.txt")


def test_bundle_and_manifest_load_from_s3(s3, trained_bundle, synthetic_data, tmp_path):
    for name in ("bundle.json", "vocabulary.json", "decoder.weights.h5", "backbone.weights.h5"):
        s3.upload_file(trained_bundle / name, f"s3://captions/models/m1/{name}")
    local = load_bundle(trained_bundle)
    remote = load_bundle("s3://captions/models/m1", storage=s3)
    assert remote.version == local.version
    s3.write_bytes("s3://captions/m/test.jsonl", synthetic_data["test"].read_bytes())
    manifest = read_manifest("s3://captions/m/test.jsonl", storage=s3)
    assert len(manifest.examples) == len(read_manifest(synthetic_data["test"]).examples)
    assert manifest.source == "s3://captions/m/test.jsonl"


def test_local_paths_and_file_uris(tmp_path):
    storage = Storage()
    storage.write_bytes(f"file://{tmp_path}/d/x.txt", b"hi")
    assert storage.read_bytes(str(tmp_path / "d" / "x.txt")) == b"hi"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".tmp-y.txt").write_bytes(b"half written")  # what a killed writer leaves behind
    assert storage.list(str(tmp_path)) == [str(tmp_path / "d" / "x.txt")]
    assert not list((tmp_path / "d").glob(".tmp-*"))


def test_absolute_makes_local_paths_absolute_and_leaves_remote_uris(tmp_path, monkeypatch):
    from captioning.storage import absolute

    monkeypatch.chdir(tmp_path)
    assert absolute("models/m1") == str(tmp_path / "models" / "m1")
    assert absolute(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert absolute("s3://bucket/m1") == "s3://bucket/m1"
    assert absolute("https://example.com/m.csv") == "https://example.com/m.csv"


def test_concurrent_local_writers_of_one_path_leave_one_whole_file(tmp_path):
    # A retried task can write the same shard file as its lost original, at the same moment.
    from concurrent.futures import ThreadPoolExecutor

    storage, target = Storage(), str(tmp_path / "shard.bin")

    def write(value: int) -> None:
        for _ in range(10):
            storage.write_bytes(target, bytes([value]) * 1_000_000)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))  # raises if one writer's rename lost its temp file to another
    data = (tmp_path / "shard.bin").read_bytes()
    assert len(data) == 1_000_000 and len(set(data)) == 1
    assert storage.list(str(tmp_path)) == [target]


def test_storage_serve_command_runs_until_sigterm(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "credentials.env").write_text("export OLD=1\n")
    (tmp_path / "credentials.env").chmod(0o644)  # left readable by an older version: must not stay so
    proc = subprocess.Popen([sys.executable, "-m", "cli", "storage", "serve", "--dir", str(tmp_path),
                             "--bucket", "outputs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "S3 endpoint" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert "S3 endpoint" in line, proc.stderr.read() if proc.poll() is not None else "no start line"
        env = dict(line.removeprefix("export ").split("=", 1)
                   for line in (tmp_path / "credentials.env").read_text().splitlines())
        assert env["AWS_SECRET_ACCESS_KEY"] not in line  # the secret is in the 0600 file, not the log
        assert (tmp_path / "credentials.env").stat().st_mode & 0o077 == 0
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                              config=Config(s3={"addressing_style": "path"}))
        Storage(client=client).write_bytes("s3://outputs/x.txt", b"ok")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "weed" not in subprocess.run(["pgrep", "-af", f"weed mini -dir={tmp_path}"], capture_output=True,
                                        text=True).stdout


def test_conditional_create_and_replace_on_the_real_server(s3):
    where = "s3://captions/cond/lease.json"
    tag = s3.create(where, b"first")
    assert tag and s3.create(where, b"second") is None  # If-None-Match: * is enforced
    assert s3.read_tagged(where) == (b"first", tag)
    newer = s3.replace_if(where, b"third", tag)
    assert newer and newer != tag
    assert s3.replace_if(where, b"stale writer", tag) is None  # a stale If-Match is refused
    assert s3.read_tagged(where)[0] == b"third"
    s3.delete(where)
    assert s3.read_tagged(where) is None


def test_conditional_create_and_replace_locally(tmp_path):
    storage, where = Storage(), str(tmp_path / "x" / "lease.json")
    tag = storage.create(where, b"first")
    assert tag and storage.create(where, b"second") is None
    assert storage.replace_if(where, b"third", "not-the-tag") is None
    assert storage.replace_if(where, b"third", tag) and (tmp_path / "x" / "lease.json").read_bytes() == b"third"
    assert not [p for p in (tmp_path / "x").iterdir() if p.name.startswith(".tmp-")]


def test_capped_reads_check_the_size_first(s3):
    s3.write_bytes("s3://captions/big.bin", b"x" * 5000)
    with pytest.raises(StorageError) as err:
        s3.read_bytes("s3://captions/big.bin", max_bytes=1000)
    assert err.value.reason == "too_large"
    assert len(s3.read_bytes("s3://captions/big.bin", max_bytes=5000)) == 5000


def test_downloads_stay_inside_their_folder_and_skip_folder_markers(tmp_path, monkeypatch):
    storage = Storage()
    fetched = []
    monkeypatch.setattr(storage, "download_file", lambda uri, path: fetched.append(path))
    monkeypatch.setattr(storage, "list", lambda prefix: [f"{prefix}bundle.json", f"{prefix}sub/"])
    target = storage.local_dir("s3://b/m1", cache=tmp_path)
    assert fetched == [target / "bundle.json"]  # the folder marker "sub/" is not a file to fetch
    monkeypatch.setattr(storage, "list", lambda prefix: [f"{prefix}../../../escape.txt"])
    with pytest.raises(StorageError) as err:
        storage.local_dir("s3://b/m1", cache=tmp_path)
    assert err.value.reason == "unsafe_path" and len(fetched) == 1


def test_s3_downloads_go_to_a_private_cache_not_tmp(tmp_path, monkeypatch):
    from captioning.storage import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = cache_dir()
    assert folder == tmp_path / "cache" / "captioning" and folder.stat().st_mode & 0o777 == 0o700
    storage = Storage()
    monkeypatch.setattr(storage, "download_file", lambda uri, path: path)
    assert storage.local_file("s3://b/manifests/m.csv").is_relative_to(folder)


def test_local_writes_are_synced_before_they_are_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(self, target):
        events.append(("rename", str(self), str(target)))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    Storage().write_bytes(str(tmp_path / "_committed" / "m.json"), b"{}")
    synced_file = next(i for i, e in enumerate(events) if e[0] == "fsync" and ".tmp-" in e[1])
    renamed = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced_folder = [i for i, e in enumerate(events) if e == ("fsync", str(tmp_path / "_committed"))]
    assert synced_file < renamed < synced_folder[0]
    assert events[synced_file][1] == events[renamed][1]  # the very file that is then renamed


def test_internal_listeners_refuse_strangers(seaweed):
    import urllib.error
    import urllib.request

    import grpc

    Storage(client=seaweed.client()).write_bytes("s3://captions/private.txt", b"secret")
    filer = f"http://127.0.0.1:{seaweed.ports['filer.port']}"
    for method, path, data in (("GET", "/buckets/captions/private.txt", None), ("GET", "/buckets/", None),
                               ("PUT", "/buckets/captions/evil.txt", b"evil")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(filer + path, data=data, method=method), timeout=10)
        assert err.value.code == 401, (method, path)
    for port in ("filer.port.grpc", "master.port.grpc", "volume.port.grpc"):
        channel = grpc.insecure_channel(f"127.0.0.1:{seaweed.ports[port]}")
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=2)  # plaintext gRPC: no TLS, no entry
        channel.close()
    assert seaweed.data_dir.stat().st_mode & 0o777 == 0o700
    assert all((seaweed.data_dir / "tls" / f).stat().st_mode & 0o777 == 0o600 for f in ("key.pem", "cert.pem"))


def test_each_storage_signs_with_the_keys_set_when_it_starts(monkeypatch):
    # boto3's default session keeps the first credentials it resolves; a long-lived process must not.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "FIRSTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    first = Storage().client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "SECONDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "second-secret")
    second = Storage().client
    assert first._request_signer._credentials.access_key == "FIRSTKEY"
    assert second._request_signer._credentials.access_key == "SECONDKEY"
