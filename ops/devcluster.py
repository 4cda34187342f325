"""A local development cluster: a Ray head on 127.0.0.1 with token auth, and SeaweedFS, until Ctrl+C or `down`.

    python -m ops.devcluster up --dir runs/devcluster      # (cluster/dev-cluster.sh up) foreground; Ctrl+C stops
    source runs/devcluster/env.sh                             # in another shell: RAY_ADDRESS, token path, S3 settings
    python -m ops.devcluster down --dir runs/devcluster    # from any shell

The token and the S3 secret live only in files of the folder (0600); nothing prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from captioning.atomic import atomic_write
from captioning.errors import CaptioningError
from jobs.options import guarded, log, positive, result
from ops.seaweed import SeaweedServer, free_ports


OTHER_PORTS = ("dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port", "node-manager-port",
               "object-manager-port", "ray-client-server-port", "runtime-env-agent-port")


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with token auth, its own temp folder and explicit ports."""

    def __init__(self, folder: Path, cpus: int | None = None, token: str | None = None) -> None:
        self.folder = Path(folder).resolve()
        self.cpus = cpus
        self.token_file = self.folder / "auth_token"
        # Ray's session folder holds unix sockets, whose paths may not exceed 107 bytes: a short fixed place.
        self.temp_dir = Path("/tmp") / f"ray-dev-{hashlib.sha1(str(self.folder).encode()).hexdigest()[:10]}"
        self._token = token
        self.process: subprocess.Popen | None = None
        # Every listener explicit: a second Ray on the same machine (or SeaweedFS) holds the defaults.
        self.port, self.dashboard_port, *others = free_ports(2 + len(OTHER_PORTS))
        self.other_ports = dict(zip(OTHER_PORTS, others))

    @property
    def address(self) -> str:
        """The job API (dashboard) address for `captioning jobs --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """The address `ray.init` / `--address` joins."""
        return f"127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a client of this head sets: the address, token mode and the token's file (not the token)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def start(self, env: dict[str, str] | None = None, timeout: float = 120.0) -> RayHead:
        """Start the head and wait until its job API answers with the token."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.token_file.exists():
            atomic_write(self.token_file, (self._token or secrets.token_hex(32)).encode(), mode=0o600)
        ray = Path(sys.executable).with_name("ray")
        args = [str(ray if ray.exists() else "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
                *[f"--{flag}={port}" for flag, port in self.other_ports.items()],
                *([f"--num-cpus={self.cpus}"] if self.cpus else [])]
        head_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        head_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)})
        # A job's entrypoint says `python`: this environment's, with the project's pinned dependencies.
        head_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), head_env.get("PATH", "")])
        log_file = open(self.folder / "ray-head.log", "ab")  # noqa: SIM115  (owned by the child process)
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=head_env,
                                        start_new_session=True)
        log_file.close()
        deadline = time.monotonic() + timeout
        while not self._answers(head_env):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise CaptioningError(str(self.folder / "ray-head.log"), f"the Ray head did not come up: {tail}")
            time.sleep(1.0)
        return self

    def _answers(self, env: dict[str, str]) -> bool:
        import requests  # noqa: PLC0415  (Ray's own dependency)

        token = self.token_file.read_text().strip()
        try:
            reply = requests.get(f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        except requests.RequestException:
            return False
        return reply.status_code == 200

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: below `ray start`, or naming its temp folder."""
        found: dict[int, psutil.Process] = {}
        if self.process is not None:
            try:
                parent = psutil.Process(self.process.pid)
                found.update({p.pid: p for p in [parent, *parent.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every process of the head, SIGKILL to what is left after the timeout. Never `ray stop`: that
        would also stop every other Ray on this machine."""
        procs = self.processes()
        _send(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        _send(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        if self.process is not None:
            self.process.wait()

    def log_tail(self, lines: int = 5) -> str:
        """Last lines of the head's log, for error messages."""
        path = self.folder / "ray-head.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])


def _send(procs: list[psutil.Process], signum: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signum)


def up(folder: Path, cpus: int | None, buckets: list[str]) -> int:
    """Start SeaweedFS and the Ray head, write env.sh, print the exports, run until interrupted, stop both."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid_file = folder / "devcluster.pid"
    if pid_file.exists() and psutil.pid_exists(int(pid_file.read_text() or 0)):
        raise CaptioningError(str(folder), f"a dev cluster already runs here (pid {pid_file.read_text()}); "
                              "stop it with `down` first")
    signal.signal(signal.SIGTERM, _interrupt)
    storage = SeaweedServer(folder / "s3")
    head = RayHead(folder, cpus)
    try:
        storage.start()
        for bucket in buckets:
            storage.create_bucket(bucket)
        # The head's processes (and so every job's driver and workers) reach the storage with these.
        head.start(env=storage.env())
        exports = {**head.client_env(), **storage.env()}
        atomic_write(folder / "env.sh", "".join(f"export {k}={v}\n" for k, v in exports.items()).encode(), mode=0o600)
        shown = {k: v for k, v in exports.items() if k not in ("AWS_SECRET_ACCESS_KEY",)}
        result("dev cluster up: Ray head " + head.gcs_address + ", job API " + head.address
               + ", S3 " + storage.endpoint + (f" (buckets: {', '.join(buckets)})" if buckets else ""))
        result(f"in another shell: source {folder / 'env.sh'}   (it also holds the S3 secret key; the Ray token is "
               f"in {head.token_file})")
        for key, value in shown.items():
            result(f"  export {key}={value}")
        result(f"stop with Ctrl+C here, or: cluster/dev-cluster.sh down --dir {folder}")
        atomic_write(pid_file, str(os.getpid()).encode())  # last: a waiting script then reads all of the above
        while head.process.poll() is None and storage.process.poll() is None:
            time.sleep(1.0)
        raise CaptioningError(str(folder), "the Ray head or SeaweedFS exited; see ray-head.log and s3/weed.log")
    except KeyboardInterrupt:
        log("stopping the dev cluster")
        return 0
    finally:
        head.stop()
        storage.stop()
        pid_file.unlink(missing_ok=True)


def down(folder: Path, timeout: float = 60.0) -> int:
    """Stop the dev cluster running in folder (SIGTERM to its `up`, which stops both servers)."""
    pid_file = folder.resolve() / "devcluster.pid"
    if not pid_file.exists():
        raise CaptioningError(str(folder), "no dev cluster runs here")
    pid = int(pid_file.read_text())
    try:
        process = psutil.Process(pid)
        process.terminate()
        process.wait(timeout)
    except psutil.NoSuchProcess:
        pid_file.unlink(missing_ok=True)
    result(f"dev cluster in {folder} stopped")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """python -m ops.devcluster up|down --dir FOLDER."""
    parser = argparse.ArgumentParser(prog="python -m ops.devcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path("runs/devcluster"), help="state folder (default %(default)s)")
    parser.add_argument("--cpus", type=positive, default=None, help="CPUs the head offers (default: all)")
    parser.add_argument("--bucket", action="append", default=None, help="bucket to create (default: captioning)")
    args = parser.parse_args(argv)
    if args.action == "down":
        return guarded(lambda: down(args.dir))
    return guarded(lambda: up(args.dir, args.cpus, args.bucket or ["captioning"]))


if __name__ == "__main__":
    sys.exit(main())
