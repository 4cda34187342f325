"""A long-lived scheduler: on each cron tick it starts a job (retraining by default) here, or submits it to a
cluster; it skips a tick while the previous run still goes on, and keeps its state in storage so that a
restarted scheduler never runs a tick twice.

    <state>/schedule.json           the cron expression, job kind and options (a restart must match them)
    <state>/ticks/<tick>.json       one decision per tick, created with If-None-Match: the tick is claimed before
                                    the job starts, so each tick runs at most once, whoever asks
Ticks are in UTC. A tick missed while no scheduler ran is run once when one starts (the latest only, never a
backlog), unless it is older than the schedule itself.

A tick is decided once, as `started`, `skipped` (the previous run goes on) or `failed` (its run could not be
started, or whether the previous run goes on could not be told): the scheduler records the reason and waits for
the next tick, whatever went wrong. A tick left `starting` by a scheduler that died in between is settled as
`failed` by the next scheduler that sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import psutil
from croniter import CroniterBadDateError, croniter

from captioning.errors import CaptioningError
from captioning.records import parse_record
from captioning.redaction import redact_text
from captioning.lease import live_holder, process_gone, this_process
from jobs.kinds import JOBS
from jobs.options import log as print_log
from captioning.storage import Storage, is_s3, local_path

TICK_FORMAT = "%Y%m%dT%H%M%SZ"
# A `starting` record older than this, whose scheduler cannot be seen from here, belongs to one that died.
STARTING_LIMIT = 600.0
RETRY_AFTER_FAILURE = 30.0  # seconds between tries when a tick cannot even be decided (storage down)


class Runner(Protocol):
    """How a tick's job runs: start it, and tell whether a run started earlier still goes on."""

    def start(self, kind: str, args: list[str], tick: str) -> dict[str, Any]:
        """Start the job; returns what identifies the run (kept in the tick's record)."""

    def running(self, run: dict[str, Any]) -> bool:
        """Whether that run still goes on."""


class LocalRunner:
    """`python -m jobs.<kind> ARGS` as a child process of this machine, its output in <logs>/<tick>.log."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs

    def start(self, kind: str, args: list[str], tick: str) -> dict[str, Any]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{tick}.log"
        with open(log_path, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", JOBS[kind].module, *args], stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return {"where": "local", "pid": process.pid, "host": os.uname().nodename,
                "started": psutil.Process(process.pid).create_time(), "log": str(log_path)}

    def running(self, run: dict[str, Any]) -> bool:
        if run.get("host") != os.uname().nodename:
            return False  # another machine's child: it cannot be seen from here
        try:
            process = psutil.Process(run["pid"])
            # The same pid and start time: the run itself, not a later process that got its pid.
            return process.create_time() == run["started"] and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


class ClusterRunner:
    """The job submitted to a Ray cluster (captioning jobs submit), followed by its Ray job status."""

    def __init__(self, address: str, code: str = "checkout") -> None:
        self.address, self.code = address, code

    def start(self, kind: str, args: list[str], tick: str) -> dict[str, Any]:
        from ops.submit import Cluster, Submission  # noqa: PLC0415

        job_id = Cluster(self.address).submit(Submission(kind, args, name=f"{kind}-{tick}", code=self.code))
        return {"where": "ray", "job_id": job_id}

    def running(self, run: dict[str, Any]) -> bool:
        from ops.submit import TERMINAL, Cluster  # noqa: PLC0415

        state, _ = Cluster(self.address).status(run["job_id"])
        return state not in TERMINAL


def output_lease(kind: str, args: list[str]) -> str | None:
    """Where the job's run holds its lease: the very option the job writes to, parsed by the job's own options."""
    return JOBS[kind].lease(args)


def utc(timestamp: float) -> datetime:
    """A POSIX time as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


def check_cron(cron: str, now: float) -> None:
    """A cron expression of five fields (six with seconds) that fires at least once from now on."""
    fields = cron.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(cron):
        raise CaptioningError("--cron", f"{cron!r} is not a cron expression (five fields, or six with seconds)")
    try:
        croniter(cron, utc(now)).get_next(datetime)
    except (CroniterBadDateError, ValueError, OverflowError):
        raise CaptioningError("--cron", f"{cron!r} never fires (no such date comes)") from None


class Scheduler:
    """Decides each tick once: start the job, skip it while the previous run goes on, or record why it failed."""

    def __init__(self, cron: str, state: str, kind: str, args: list[str], runner: Runner,
                 storage: Storage | None = None, clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] = print_log) -> None:
        check_cron(cron, clock())
        self.cron, self.kind, self.args, self.runner = cron, kind, args, runner
        self.state = state.rstrip("/") if is_s3(state) else str(local_path(state))
        self.storage = storage or Storage()
        self.clock, self.log = clock, log
        self.lease = output_lease(kind, args)
        self.since = self._schedule()

    def _at(self, *parts: str) -> str:
        return "/".join([self.state, *parts])

    def _schedule(self) -> float:
        """The schedule's record, made once; a restart with another cron or job is refused. Returns since when
        the schedule exists, on this host's clock at most (a host whose clock ran ahead never holds ticks back)."""
        record = {"cron": self.cron, "kind": self.kind, "args": self.args, "since": self.clock()}
        uri = self._at("schedule.json")
        self.storage.create(uri, json.dumps(record, indent=2).encode())
        kept = parse_record(uri, self.storage.read_bytes(uri), "schedule")
        if (kept["cron"], kept["kind"], kept["args"]) != (self.cron, self.kind, self.args):
            raise CaptioningError(self.state, f"holds another schedule ({kept['cron']!r}, {kept['kind']} "
                                  f"{' '.join(kept['args'])}); use another --state for this one")
        return min(float(kept["since"]), self.clock())

    def due(self, now: float) -> datetime | None:
        """The latest tick at or before now, if the schedule already existed then."""
        tick = croniter(self.cron, utc(now)).get_prev(datetime)
        return tick if tick.timestamp() >= self.since else None

    def next_tick(self, now: float) -> float:
        """When the next tick comes."""
        return croniter(self.cron, utc(now)).get_next(datetime).timestamp()

    def records(self) -> list[dict[str, Any]]:
        """Every tick's decision, oldest first (an unreadable record is logged and left out)."""
        keys = sorted(k for k in self.storage.list(self._at("ticks")) if k.endswith(".json"))
        found = []
        for key in keys:
            try:
                found.append(parse_record(key, self.storage.read_bytes(key), "tick"))
            except CaptioningError as err:
                self.log(f"warning: {err}")
        return found

    def settle(self, now: float) -> None:
        """Record as failed every tick a dead scheduler left `starting` (it may have started nothing)."""
        for key in sorted(k for k in self.storage.list(self._at("ticks")) if k.endswith(".json")):
            tagged = self.storage.read_tagged(key)
            if tagged is None:
                continue
            try:
                record = parse_record(key, tagged[0], "tick")
            except CaptioningError:
                continue
            if record["decision"] != "starting":
                continue
            by = record.get("by_process", {})
            age = self.storage.age(key)
            if not process_gone(by) and (age is None or age < STARTING_LIMIT):
                continue  # its scheduler may still be starting the run
            settled = {**record, "decision": "failed", "reason": "scheduler stopped before the run started"}
            if self.storage.replace_if(key, json.dumps(settled).encode(), tagged[1]) is not None:
                self.log(f"tick {record['tick']}: failed (scheduler stopped before the run started)")

    def _busy(self) -> str | None:
        """Why a tick must be skipped now, or None."""
        started = [r for r in self.records() if r["decision"] == "started"]
        previous = started[-1] if started else None
        if previous is not None and self.runner.running(previous["run"]):
            return f"the run of tick {previous['tick']} still goes on"
        if self.lease is not None:  # any run writing the job's output, started here or anywhere else
            holder = live_holder(self.storage, self.lease)
            if holder is not None:
                return (f"a {holder.get('what', 'run')} holds {self.lease} (host {holder.get('host', '?')}, pid "
                        f"{holder.get('pid', '?')}, heartbeat {holder['age']:.0f} s ago)")
        return None

    def step(self, now: float | None = None) -> dict[str, Any] | None:
        """Decide the due tick if nobody has; returns the decision made here (None: nothing to decide)."""
        now = self.clock() if now is None else now
        self.settle(now)
        tick = self.due(now)
        if tick is None:
            return None
        name = tick.strftime(TICK_FORMAT)
        where = self._at("ticks", f"{name}.json")
        if self.storage.exists(where):
            return None
        decision: dict[str, Any] = {"tick": name, "decided": utc(now).strftime(TICK_FORMAT),
                                    "by": f"pid {os.getpid()}", "by_process": this_process()}
        try:
            busy = self._busy()
        except Exception as err:  # noqa: BLE001  (a run that cannot be checked: the tick fails, the scheduler lives)
            decision.update(decision="failed", reason=f"could not tell whether the previous run goes on: "
                            f"{one_line(err)}")
        else:
            if busy is not None:
                decision.update(decision="skipped", reason=busy)
            else:
                decision.update(decision="starting")
        # Claimed before anything starts: a second scheduler, or this one restarted, finds the tick decided.
        if self.storage.create(where, json.dumps(decision).encode()) is None:
            return None
        if decision["decision"] == "starting":
            try:
                decision.update(decision="started", run=self.runner.start(self.kind, self.args, name))
            except Exception as err:  # noqa: BLE001
                decision.update(decision="failed", reason=f"the run could not be started: {one_line(err)}")
            self.storage.write_bytes(where, json.dumps(decision).encode())
        detail = f" {self.kind}: {json.dumps(decision['run'])}" if decision["decision"] == "started" \
            else f" ({decision['reason']})"
        line = f"tick {name}: {decision['decision']}{detail}"
        self.log(f"warning: {line}" if decision["decision"] == "failed" else line)
        return decision

    def run(self, max_ticks: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        """Decide ticks until interrupted (or until max_ticks decisions were made here)."""
        made = 0
        self.log(f"schedule {self.cron!r} (UTC): {self.kind} {' '.join(self.args)}; state in {self.state}")
        while max_ticks is None or made < max_ticks:
            try:
                decided = self.step()
            except Exception as err:  # noqa: BLE001  (storage down, say: a long-lived process lives on)
                self.log(f"warning: could not decide the due tick: {one_line(err)}; trying again in "
                         f"{RETRY_AFTER_FAILURE:.0f} s")
                sleep(RETRY_AFTER_FAILURE)
                continue
            if decided is not None:
                made += 1
                continue
            now = self.clock()
            sleep(max(0.05, min(self.next_tick(now) - now, 60.0)))


def one_line(err: BaseException) -> str:
    """An exception as one short line, secrets redacted."""
    text = str(err) if isinstance(err, CaptioningError) else f"{type(err).__name__}: {err}"
    return redact_text(" ".join(text.split()))[:500]
