"""Shared fixtures: a loopback HTTP server with scripted routes, synthetic data, a tiny trained model."""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from captioning.config import FetchConfig, ModelConfig, TrainConfig  # noqa: E402

# Loopback only, and patient: a test that counts rows must not lose one to a 1 s timeout on 2 busy cores.
PATIENT_LOOPBACK = FetchConfig(allowed_networks=("127.0.0.1/32",), retries=0, read_timeout=20.0, deadline=40.0)


@dataclass
class Reply:
    """What a route answers: status, headers, body, and an optional delay before the body."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drip: float = 0.0  # seconds between single bytes of the whole response (headers too): a slow-drip server


def tagged_jpeg(data: bytes, tag: bytes) -> bytes:
    """The same JPEG with a comment segment after its start marker: other bytes (another sha256), same pixels."""
    assert data[:2] == b"\xff\xd8"
    return data[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + data[2:]


class LoopbackServer:
    """Threaded HTTP server on 127.0.0.1; routes map a path to a Reply or a function of the hit count."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply | Callable[[int], Reply]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                server.hits[path] += 1
                route = server.routes.get(path)
                reply = route(server.hits[path]) if callable(route) else route
                if reply is None:
                    reply = Reply(404, b"not found")
                if reply.drip:
                    self._drip(reply)
                    return
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        if value:  # an empty value leaves the header out (Content-Length: "" -> close-delimited)
                            self.send_header(key, value)
                    if "Content-Length" not in reply.headers:
                        self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if reply.delay:
                        time.sleep(reply.delay)
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _drip(self, reply: Reply) -> None:
                head = f"HTTP/1.1 {reply.status} OK\r\nContent-Length: {len(reply.body)}\r\n\r\n".encode()
                try:
                    for byte in head + reply.body:  # finite: the server stops by itself
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(reply.drip)
                except OSError:  # the client gave up: what the test wants
                    pass

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def fetches(self) -> int:
        """Requests for anything but /robots.txt (which a polite job asks for once per job)."""
        return sum(n for path, n in self.hits.items() if path != "/robots.txt")

    def url(self, path: str) -> str:
        """Full URL of a path on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    """A fresh loopback server per test."""
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS server for the whole session (buckets captions and outputs), stopped at the end."""
    from ops.seaweed import SeaweedServer

    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        for bucket in ("captions", "outputs"):
            server.create_bucket(bucket)
        yield server


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(seaweed):
    """One local Ray for the session; its workers inherit the SeaweedFS credentials from this environment."""
    import ray

    saved = {k: os.environ.get(k) for k in seaweed.env()}
    os.environ.update(seaweed.env())
    # Metrics exported as a cluster's are (each node's agent, Prometheus text), reported every second.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _metrics_export_port=free_port(), _system_config={"metrics_report_interval_ms": 1000})
    yield seaweed
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    """A small deterministic synthetic dataset shared by the session."""
    from captioning.datasets import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return synthetic.generate(out, {"train": 240, "val": 40, "test": 24}, seed=7, progress=False)


TINY_MODEL = ModelConfig(max_length=20, d_model=32, num_layers=1, num_heads=2, dropout=0.0)


def tiny_config(**overrides) -> TrainConfig:
    """A training config that runs in seconds."""
    values = dict(model=TINY_MODEL, weights="none", epochs=2, batch_size=32, learning_rate=3e-3, patience=3, seed=1,
                  backbone_seed=1)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> str:
    """One backbone feature cache for every test that trains on the synthetic data: features once a session."""
    return str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(scope="session")
def trained_bundle(synthetic_data, feature_cache, tmp_path_factory) -> Path:
    """A tiny model trained for two epochs on the synthetic data."""
    from captioning.manifest import read_manifest
    from captioning.train import train

    out = tmp_path_factory.mktemp("model")
    train(read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), out,
          tiny_config(cache_dir=feature_cache), progress=False, log=lambda _: None)
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (-n 2 --dist loadgroup), every test that uses the session's Ray instance runs on one
    worker, beside it; tests that start Ray in a process of their own may run on either."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def feature_sets(synthetic_data, tmp_path_factory) -> dict[str, str]:
    """Feature sets of the synthetic train (10 shards) and val (2 shards) splits, made in-process once."""
    from captioning.featureset import FeaturesConfig, extract_features

    root = tmp_path_factory.mktemp("feature-sets")
    sets = {}
    for split in ("train", "val"):
        config = FeaturesConfig.reading_own_kind(str(synthetic_data[split]), str(root / split), weights="none",
                                                 seed=1, shard_size=24)
        extract_features(config, log=lambda _: None, progress=False)
        sets[split] = str(root / split)
    return sets
