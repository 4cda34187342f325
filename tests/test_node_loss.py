"""Node loss: a bulk job on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster, in its own
process: no shared Ray instance) loses the worker node running its captioning actor mid-job; another joins."""

import json

import pytest

from captioning.bulk import read_output
from tests.conftest import LoopbackServer, Reply


@pytest.fixture
def served(synthetic_data):
    server = LoopbackServer()
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[:12]
    for path in images:
        server.routes[f"/img/{path.name}"] = Reply(200, path.read_bytes(), {"Content-Type": "image/jpeg"})
    yield server, {server.url(f"/img/{p.name}"): "ok" for p in images}
    server.close()


def manifest_file(tmp_path, urls):
    (tmp_path / "m.csv").write_text("id,url\n" + "".join(f"r{i},{url}\n" for i, url in enumerate(urls)))
    return str(tmp_path / "m.csv")


def test_a_worker_node_lost_mid_job_and_another_joining_leaves_every_row_once(served, trained_bundle, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    server, expected = served
    urls = [u for u, s in expected.items() if s == "ok"]
    manifest = manifest_file(tmp_path, urls)
    output = tmp_path / "out"
    root = Path(__file__).resolve().parent.parent
    import shutil
    import tempfile

    # Its own Ray temp dir (short: Ray's socket paths live below it): the cluster never touches this machine's.
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    with open(tmp_path / "job.log", "w") as log:
        done = subprocess.run([sys.executable, str(root / "tests" / "node_loss.py"), manifest, str(trained_bundle),
                               str(output)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=300)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (tmp_path / "job.log").read_text()[-3000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    removed = report["events"][0]
    assert removed["job_running"] and removed["removed_after_shards"] < len(urls) // 2  # the node went mid-job
    assert report["events"][1] == {"added": True}
    assert report["rows"] == len(urls) and report["statuses"] == {"ok": len(urls)}
    rows = list(read_output(str(output)))
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(len(urls)))
