"""Where a Ray command runs: no --address is a fresh local Ray whatever this machine ran before; `auto` is the
cluster `ray start` recorded; an address nobody answers at is one error line within the stated time. Never
touches this machine's own Ray files: Ray reads its temp dir from RAY_TMPDIR."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from captioning.errors import CaptioningError
from jobs.ray_setup import cluster_address, wait_reachable


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def stale_ray_tmpdir():
    """A Ray temp dir whose ray_current_cluster names a head that was killed, not stopped."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live below it
    (root / "ray").mkdir()
    address = f"127.0.0.1:{closed_port()}"
    (root / "ray" / "ray_current_cluster").write_text(address)
    yield root, address
    subprocess.run(["rm", "-rf", str(root)], check=False)


def test_which_cluster_each_address_means(stale_ray_tmpdir, monkeypatch):
    root, stale = stale_ray_tmpdir
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None  # a fresh local Ray, not the recorded (stale) cluster
    assert cluster_address("auto") == stale
    assert cluster_address("10.1.2.3:6379") == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:7000")  # a submitted job's driver
    assert cluster_address(None) == "127.0.0.1:7000"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a job API address: not a cluster to join
    assert cluster_address(None) is None
    (root / "ray" / "ray_current_cluster").unlink()
    with pytest.raises(CaptioningError, match="--address auto: no Ray cluster was started on this machine"):
        cluster_address("auto")


def test_an_address_nobody_answers_at_fails_within_its_timeout():
    address = f"127.0.0.1:{closed_port()}"
    began = time.monotonic()
    with pytest.raises(CaptioningError, match=rf"--address: no Ray cluster answers at {address} \(tried for 2 s"):
        wait_reachable(address, 2.0, shown="--address")
    assert 1.5 < time.monotonic() - began < 10
    with pytest.raises(CaptioningError, match="expected HOST:PORT"):
        wait_reachable("nonsense", 1.0)


def test_a_stale_recorded_cluster_neither_hangs_the_default_nor_auto(stale_ray_tmpdir, trained_bundle, tmp_path):
    root, stale = stale_ray_tmpdir
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"url\n{image}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(root))
    command = [sys.executable, "-m", "cli", "batch", "--manifest", str(manifest), "--model", str(trained_bundle),
               "--allow-local-files", "--no-attention"]

    began = time.monotonic()
    auto = subprocess.run([*command, "--output", str(tmp_path / "auto"), "--address", "auto",
                           "--connect-timeout", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert auto.returncode == 2 and time.monotonic() - began < 60, auto.stderr
    errors = [line for line in auto.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --address auto: no Ray cluster answers at {stale} (tried for 3 s: Connection refused); check "
                      "the address, or leave --address out to run on a local Ray"], auto.stderr
    assert "Traceback" not in auto.stderr

    # Without --address: a fresh local Ray, never the recorded one (the job code's own connect, in a process of
    # its own; the whole batch job on it is what every other bulk test runs).
    code = ("import ray; from jobs.ray_setup import connect; joined = connect(None); "
            "print(joined, ray.get_runtime_context().gcs_address); ray.shutdown()")
    local = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr[-2000:]
    joined, address = local.stdout.split()
    assert joined == "False" and address != stale and "Failed to connect to GCS" not in local.stderr
