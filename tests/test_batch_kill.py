"""Kill the whole bulk job, or its workers, mid-run: the same row set, no duplicates, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioning.bulk import read_output
from tests.conftest import LoopbackServer, Reply, tagged_jpeg

pytestmark = pytest.mark.ray

ROWS, SHARD = 40, 4
SHARDS = ROWS // SHARD


@pytest.fixture
def slow_manifest(synthetic_data, tmp_path):
    """A manifest of ROWS loopback URLs, each answered after 0.3 s: slow enough to kill things mid-run."""
    server = LoopbackServer()
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))
    urls = []
    for i in range(ROWS):
        # Bytes of its own per row: equal bytes would be captioned once (duplicates), not what is tested here.
        server.routes[f"/{i}.jpg"] = Reply(200, tagged_jpeg(images[i % len(images)].read_bytes(), str(i).encode()),
                                           delay=0.3)
        urls.append(server.url(f"/{i}.jpg"))
    (tmp_path / "m.csv").write_text("id,url\n" + "".join(f"r{i},{u}\n" for i, u in enumerate(urls)))
    yield str(tmp_path / "m.csv")
    server.close()


def batch_command(manifest, model, output):
    return [sys.executable, "-m", "cli", "batch", "--manifest", manifest, "--model", model,
            "--output", output, "--id-column", "id", "--shard-size", str(SHARD), "--batch-size", "4",
            "--fetch-threads", "2", "--allow-network", "127.0.0.1/32", "--no-progress"]


def start_and_wait_for_commits(command, out: Path, shards: int) -> subprocess.Popen:
    """Start the job in its own session; return once `shards` shards are committed (it is still running)."""
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    wait_for_commits(job, out, shards)
    return job


def wait_for_commits(job: subprocess.Popen, out: Path, shards: int) -> None:
    """Return once `shards` shards are committed, asserting the job is still running then."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        if len(committed(out)) >= shards:
            break
        time.sleep(0.1)
    assert job.poll() is None, job.stdout.read()[-2000:]  # still running: we act mid-run


def committed(out: Path) -> list[Path]:
    return sorted((out / "_committed").glob("shard-*.json")) if (out / "_committed").exists() else []


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below root (Ray's raylet and workers run below the job)."""
    parents, cmdlines = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            cmdlines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdlines[pid]
                frontier.append(pid)
    return found


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the job, its process group and every process below it (a Ray worker may have left the group),
    and return only once all are gone: no shard may commit after this."""
    import psutil

    below = [psutil.Process(pid) for pid in descendants(job.pid) if psutil.pid_exists(pid)]
    os.killpg(job.pid, signal.SIGKILL)
    for process in below:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(below, timeout=30)
    job.wait()


def assert_exactly_once(out: Path) -> None:
    rows = list(read_output(str(out)))
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(ROWS))  # all there, each once
    assert all(r["status"] == "ok" and r["caption"] for r in rows)
    assert (out / "_SUCCESS.json").exists()


def test_killed_workers_then_a_killed_job_finish_exactly_once(slow_manifest, trained_bundle, tmp_path):
    out = tmp_path / "out"
    command = batch_command(slow_manifest, str(trained_bundle), str(out))
    job = start_and_wait_for_commits(command, out, 1)
    try:
        # The captioning actor and whatever fetch/write task workers are busy right now.
        victims = {pid: cmd for pid, cmd in descendants(job.pid).items()
                   if "CaptionShard" in cmd or "fetch_shard" in cmd or "write_shard" in cmd}
        assert any("CaptionShard" in cmd for cmd in victims.values()), descendants(job.pid)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        # Ray restarts the actor and retries the lost tasks: the same run goes on committing shards.
        wait_for_commits(job, out, 4)
    finally:
        kill_job(job)  # then the whole job dies mid-run
    committed_before = len(committed(out))
    assert 4 <= committed_before < SHARDS
    assert not (out / "_SUCCESS.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"{SHARDS - committed_before} to process" in second.stderr
    assert "its process is gone" in second.stderr  # the killed run's lease was taken over at once
    assert_exactly_once(out)
    # Shards were captioned by the first actor, its replacement or the rerun's actor: more than one start-up.
    starts = {json.loads(marker.read_text())["timing"]["spans"]["actor_init"][0] for marker in committed(out)}
    assert len(starts) >= 2
