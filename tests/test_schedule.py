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
from ops.schedule import Scheduler

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


class BrokenRunner(FakeRunner):
    """start raises (a cluster briefly gone) until `broken` is cleared; running can raise too."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.check_fails = False

    def start(self, kind, args, tick):
        if self.broken:
            raise CaptioningError("http://127.0.0.1:1", "no Ray dashboard answers here")
        return super().start(kind, args, tick)

    def running(self, run):
        if self.check_fails:
            raise RuntimeError("dashboard answered 500")
        return super().running(run)


def test_a_tick_that_cannot_start_is_recorded_failed_and_the_next_tick_tries_again(tmp_path):
    runner, clock, logs = BrokenRunner(), Clock(T0), []
    decide = Scheduler("* * * * *", str(tmp_path), "retrain", ["--registry", "r"], runner, clock=clock,
                       log=logs.append)
    clock.now += 40
    failed = decide.step()
    assert failed["decision"] == "failed" and "no Ray dashboard answers here" in failed["reason"]
    assert any(line.startswith("warning: tick 20260101T000100Z: failed (the run could not be started") for line in logs)
    assert decide.step() is None  # decided: a failed tick is not retried within itself
    runner.broken = False
    clock.now += 60
    assert decide.step()["decision"] == "started" and runner.started == ["20260101T000200Z"]
    # Whether the previous run goes on cannot be told (a dashboard answering 500): that tick fails, no overlap.
    runner.check_fails = True
    clock.now += 60
    unknown = decide.step()
    assert unknown["decision"] == "failed" and "dashboard answered 500" in unknown["reason"]
    assert runner.started == ["20260101T000200Z"]
    assert [r["decision"] for r in decide.records()] == ["failed", "started", "failed"]


def test_the_loop_survives_a_failing_step_and_records_it(tmp_path):
    runner, clock, logs = FakeRunner(), Clock(T0), []
    decide = Scheduler("* * * * *", str(tmp_path), "retrain", ["--registry", "r"], runner, clock=clock,
                       log=logs.append)
    clock.now += 40
    real_step, calls = decide.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("storage went away")
        return real_step()

    decide.step = flaky_step
    decide.run(max_ticks=1, sleep=lambda seconds: None)
    assert runner.started == ["20260101T000100Z"]
    assert any("could not decide the due tick: OSError: storage went away" in line for line in logs)


def test_a_tick_left_starting_by_a_dead_scheduler_is_settled_as_failed(tmp_path):
    from captioning.lease import this_process

    runner, clock = FakeRunner(), Clock(T0)
    decide = Scheduler("* * * * *", str(tmp_path), "retrain", ["--registry", "r"], runner, clock=clock,
                       log=lambda _: None)
    clock.now += 40
    ticks = tmp_path / "ticks"
    ticks.mkdir()
    dead = {**this_process(), "pid": 2 ** 22 + 11}  # this host, this boot: a pid that no longer runs
    (ticks / "20260101T000100Z.json").write_text(json.dumps(
        {"tick": "20260101T000100Z", "decision": "starting", "by_process": dead}))
    alive = {**this_process()}  # a scheduler still starting its run (this very process): left alone
    (ticks / "20251231T235900Z.json").write_text(json.dumps(
        {"tick": "20251231T235900Z", "decision": "starting", "by_process": alive}))
    assert decide.step() is None  # 00:01 is decided already, but now as failed
    records = {r["tick"]: r for r in decide.records()}
    assert records["20260101T000100Z"]["decision"] == "failed"
    assert records["20260101T000100Z"]["reason"] == "scheduler stopped before the run started"
    assert records["20251231T235900Z"]["decision"] == "starting"
    clock.now += 60
    assert decide.step()["decision"] == "started"  # the next tick runs


def test_a_host_whose_clock_ran_a_day_ahead_never_holds_ticks_back(tmp_path):
    ahead = Scheduler("* * * * *", str(tmp_path), "retrain", ["--registry", "r"], FakeRunner(),
                      clock=Clock(T0 + 86400), log=lambda _: None)  # wrote schedule.json with its clock
    assert ahead.since == T0 + 86400
    runner, clock = FakeRunner(), Clock(T0)
    right = Scheduler("* * * * *", str(tmp_path), "retrain", ["--registry", "r"], runner, clock=clock,
                      log=lambda _: None)
    clock.now += 40
    assert right.step()["decision"] == "started"  # the first tick after it looked, not a day later
