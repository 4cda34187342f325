"""The scheduler: ticks run, a busy tick is skipped, a restarted scheduler never reruns a tick (injected clock and
runner), two schedulers on one state decide each tick once, and a real fast cron through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from captioning.errors import CaptioningError
from jobs.schedule import Scheduler

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc).timestamp()


class FakeRunner:
    """Records starts; `busy` says whether the last run still goes on."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.busy = False

    def start(self, kind, args, tick):
        self.started.append(tick)
        return {"where": "fake", "tick": tick}

    def running(self, run):
        return self.busy and run["tick"] == self.started[-1]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scheduler(state: Path, runner: FakeRunner, clock: Clock, cron: str = "* * * * *") -> Scheduler:
    return Scheduler(cron, str(state), "retrain", ["--registry", "r"], runner, clock=clock, log=lambda _: None)


def test_ticks_run_a_busy_tick_is_skipped_and_a_restart_never_reruns_a_tick(tmp_path):
    runner, clock = FakeRunner(), Clock(T0)
    first = scheduler(tmp_path, runner, clock)
    assert first.step() is None  # 00:00 came before the schedule existed
    clock.now += 40  # 00:01:10
    assert first.step()["decision"] == "started" and runner.started == ["20260101T000100Z"]
    assert first.step() is None  # the same tick again: decided already
    runner.busy = True
    clock.now += 60  # 00:02:10, the 00:01 run still going
    skipped = first.step()
    assert skipped["decision"] == "skipped" and "20260101T000100Z" in skipped["reason"]
    runner.busy = False
    clock.now += 60  # 00:03:10
    assert first.step()["decision"] == "started"
    # A restart (a new process, same state) at the same moment: nothing to rerun.
    restarted = scheduler(tmp_path, runner, clock)
    assert restarted.step() is None
    clock.now += 180  # 00:06:10 after downtime: the latest missed tick runs once, no backlog
    assert restarted.step()["tick"] == "20260101T000600Z" and restarted.step() is None
    assert runner.started == ["20260101T000100Z", "20260101T000300Z", "20260101T000600Z"]
    decisions = [(r["tick"][-7:-1], r["decision"]) for r in restarted.records()]
    assert decisions == [("000100", "started"), ("000200", "skipped"), ("000300", "started"), ("000600", "started")]


def test_two_schedulers_on_one_state_decide_each_tick_once(tmp_path):
    runner, clock = FakeRunner(), Clock(T0)
    schedulers = [scheduler(tmp_path, runner, clock) for _ in range(4)]
    clock.now += 40
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.step())) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runner.started == ["20260101T000100Z"] and sum(r is not None for r in results) == 1


def test_a_different_schedule_on_the_same_state_and_a_bad_cron_are_refused(tmp_path):
    runner, clock = FakeRunner(), Clock(T0)
    scheduler(tmp_path, runner, clock)
    with pytest.raises(CaptioningError, match="holds another schedule"):
        scheduler(tmp_path, runner, clock, cron="0 3 * * *")
    with pytest.raises(CaptioningError, match="not a cron expression"):
        scheduler(tmp_path / "other", runner, clock, cron="every day")


def test_a_fast_cron_runs_real_retrain_jobs_through_the_cli(tmp_path):
    # Every second, `python -m jobs.retrain` on an empty prefix ("nothing new": no TensorFlow), two ticks.
    data = tmp_path / "data"
    data.mkdir()
    state = tmp_path / "state"
    command = [sys.executable, "-m", "cli", "schedule", "--cron", "* * * * * */1", "--state", str(state),
               "--logs", str(tmp_path / "logs"), "--max-ticks", "2", "--",
               "--registry", str(tmp_path / "registry"), "--data-prefix", str(data), "--holdout", "h.jsonl",
               "--val", "v.jsonl"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((state / "ticks").glob("*.json"))]
    assert len(records) == 2 and all(r["decision"] in ("started", "skipped") for r in records)
    assert records[0]["decision"] == "started"
    logs = Path(records[0]["run"]["log"])
    for _ in range(100):  # the job runs on after the scheduler stops
        if "nothing new" in logs.read_text():
            break
        __import__("time").sleep(0.2)
    assert "nothing new under" in logs.read_text()
    bad = subprocess.run([*command[:command.index("--")], "--", "--registry"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_a_tick_is_skipped_while_any_run_holds_the_outputs_lease(tmp_path):
    from captioning.lease import Lease
    from captioning.storage import Storage

    registry = tmp_path / "registry"
    runner, clock = FakeRunner(), Clock(T0)
    decide = Scheduler("* * * * *", str(tmp_path / "state"), "retrain", ["--registry", str(registry), "--val", "v"],
                       runner, clock=clock, log=lambda _: None)
    assert decide.lease == f"{registry}/_lease.json"
    # A retraining started by hand (or by another scheduler, on any machine) holds the registry's lease.
    with Lease(Storage(), decide.lease, log=lambda _: None, what="retraining run"):
        clock.now += 60
        skipped = decide.step()
        assert skipped["decision"] == "skipped" and runner.started == []
        assert skipped["reason"].startswith(f"a retraining run holds {registry}/_lease.json (host ")
    clock.now += 60
    assert decide.step()["decision"] == "started" and len(runner.started) == 1
    batch = Scheduler("* * * * *", str(tmp_path / "state2"), "batch", ["--manifest", "m", "--model", "x",
                      "--output", "s3://b/out/"], runner, clock=clock, log=lambda _: None)
    assert batch.lease == "s3://b/out/_lease.json"
