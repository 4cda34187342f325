"""`captioning storage serve`: SeaweedFS on loopback, for local runs."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from captioning.errors import CaptioningError
from jobs.options import log, result


def register(commands: argparse._SubParsersAction) -> None:
    """Add the storage command group."""
    storage = commands.add_parser("storage", help="local S3-compatible storage").add_subparsers(
        dest="action", required=True)
    serve = storage.add_parser("serve", help="run SeaweedFS on loopback until interrupted")
    serve.add_argument("--dir", required=True, help="data directory")
    serve.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    serve.add_argument("--port", type=int, default=None, help="S3 port (default: a free one outside Ray's range)")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """captioning storage serve: SeaweedFS until Ctrl+C or SIGTERM; the secret goes to a 0600 file, not the log."""
    from captioning.atomic import atomic_write  # noqa: PLC0415
    from ops.seaweed import PORT_FLAGS, SeaweedServer, free_ports  # noqa: PLC0415

    data = Path(args.dir)
    if data.exists() and not data.is_dir():
        raise CaptioningError(args.dir, "is a file, not a folder: --dir is SeaweedFS's data folder")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    if args.port:
        ports["s3.port"] = args.port
    keys = {k: os.environ[v] for k, v in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"))
            if os.environ.get(v)}
    server = SeaweedServer(data, ports=ports, **keys)
    signal.signal(signal.SIGTERM, _interrupt)
    with server.start():
        for bucket in args.bucket:
            server.create_bucket(bucket)
        env_file = data / "credentials.env"
        # 0600 even when an older file was there: it holds the secret key.
        atomic_write(env_file, "".join(f"export {k}={v}\n" for k, v in server.env().items()).encode(), mode=0o600)
        result(f"S3 endpoint {server.endpoint} (access key {server.access_key}); "
            f"credentials: source {env_file}; stop with Ctrl+C")
        try:
            server.process.wait()
        except KeyboardInterrupt:
            log("stopping")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
