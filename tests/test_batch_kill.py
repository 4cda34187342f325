"""Kill the whole bulk job mid-run, rerun the same command: the same row set, no duplicates, nothing lost."""

import os
import signal
import subprocess
import sys
import time

from captioning.bulk import read_output
from tests.conftest import LoopbackServer, Reply


def batch_command(manifest, model, output):
    return [sys.executable, "-m", "captioning.cli", "batch", "--manifest", manifest, "--model", model,
            "--output", output, "--id-column", "id", "--shard-size", "4", "--batch-size", "4",
            "--fetch-threads", "2", "--allow-network", "127.0.0.1/32", "--no-progress"]


def test_kill_and_rerun_is_exactly_once(synthetic_data, trained_bundle, tmp_path):
    server = LoopbackServer()
    try:
        images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))
        urls = []
        for i in range(60):
            path = images[i % len(images)]
            server.routes[f"/{i}.jpg"] = Reply(200, path.read_bytes(), delay=0.1)  # slow enough to kill mid-run
            urls.append(server.url(f"/{i}.jpg"))
        (tmp_path / "m.csv").write_text("id,url\n" + "".join(f"r{i},{u}\n" for i, u in enumerate(urls)))
        out = tmp_path / "out"
        command = batch_command(str(tmp_path / "m.csv"), str(trained_bundle), str(out))
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            committed = list((out / "_committed").glob("shard-*.json")) if (out / "_committed").exists() else []
            if len(committed) >= 2:
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read().decode()[-2000:]  # still running: we kill it mid-run
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        committed_before = len(list((out / "_committed").glob("shard-*.json")))
        assert 2 <= committed_before < 15
        assert not (out / "_SUCCESS.json").exists()

        second = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"{15 - committed_before} to process" in second.stdout
        rows = list(read_output(str(out)))
        assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(60))  # all there, each once
        assert all(r["status"] == "ok" for r in rows)
        assert (out / "_SUCCESS.json").exists()
    finally:
        server.close()
