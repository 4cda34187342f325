"""A long-lived scheduler: on each cron tick it starts a job (retraining by default) here, or submits it to a
cluster; it skips a tick while the previous run still goes on, and keeps its state in storage so that a
restarted scheduler never runs a tick twice.

    <state>/schedule.json           the cron expression, job kind and options (a restart must match them)
    <state>/ticks/<tick>.json       one decision per tick, created with If-None-Match: the tick is claimed before
                                    the job starts, so each tick runs at most once, whoever asks
Ticks are in UTC. A tick missed while no scheduler ran is run once when one starts (the latest only, never a
backlog), unless it is older than the schedule itself.
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
from croniter import croniter

from captioning.errors import CaptioningError
from captioning.lease import live_holder
from captioning.options import log as print_log
from captioning.runs import LEASE
from captioning.storage import Storage, is_s3, local_path

TICK_FORMAT = "%Y%m%dT%H%M%SZ"


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
            process = subprocess.Popen([sys.executable, "-m", f"jobs.{kind}", *args], stdout=out,
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
        from jobs.submit import Cluster, Submission  # noqa: PLC0415

        job_id = Cluster(self.address).submit(Submission(kind, args, name=f"{kind}-{tick}", code=self.code))
        return {"where": "ray", "job_id": job_id}

    def running(self, run: dict[str, Any]) -> bool:
        from jobs.submit import TERMINAL, Cluster  # noqa: PLC0415

        state, _ = Cluster(self.address).status(run["job_id"])
        return state not in TERMINAL


def output_lease(kind: str, args: list[str]) -> str | None:
    """Where the job's run holds its lease: the very option the job writes to, parsed by the job's own options."""
    import argparse  # noqa: PLC0415

    from captioning import options  # noqa: PLC0415

    option_set, dest = {"batch": (options.batch_options, "output"), "features": (options.features_options, "output"),
                        "train": (options.train_options, "out"), "retrain": (options.retrain_options, "registry")}[kind]
    full = argparse.ArgumentParser(add_help=False)
    option_set(full)
    names = next(action.option_strings for action in full._actions if action.dest == dest)
    only = argparse.ArgumentParser(add_help=False, exit_on_error=False)  # that option alone: the rest may be absent
    only.add_argument(*names, dest=dest)
    try:
        parsed, _ = only.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        return None  # the job itself will say what is wrong with its options
    where = getattr(parsed, dest, None)
    return f"{where.rstrip('/')}/{LEASE}" if where else None


def utc(timestamp: float) -> datetime:
    """A POSIX time as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


class Scheduler:
    """Decides each tick once: start the job, or skip it while the previous run goes on."""

    def __init__(self, cron: str, state: str, kind: str, args: list[str], runner: Runner,
                 storage: Storage | None = None, clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] = print_log) -> None:
        if not croniter.is_valid(cron):
            raise CaptioningError("--cron", f"{cron!r} is not a cron expression (five fields, or six with seconds)")
        self.cron, self.kind, self.args, self.runner = cron, kind, args, runner
        self.state = state.rstrip("/") if is_s3(state) else str(local_path(state))
        self.storage = storage or Storage()
        self.clock, self.log = clock, log
        self.lease = output_lease(kind, args)
        self.since = self._schedule()

    def _at(self, *parts: str) -> str:
        return "/".join([self.state, *parts])

    def _schedule(self) -> float:
        """The schedule's record, made once; a restart with another cron or job is refused."""
        record = {"cron": self.cron, "kind": self.kind, "args": self.args, "since": self.clock()}
        self.storage.create(self._at("schedule.json"), json.dumps(record, indent=2).encode())
        kept = json.loads(self.storage.read_bytes(self._at("schedule.json")))
        if (kept["cron"], kept["kind"], kept["args"]) != (self.cron, self.kind, self.args):
            raise CaptioningError(self.state, f"holds another schedule ({kept['cron']!r}, {kept['kind']} "
                                  f"{' '.join(kept['args'])}); use another --state for this one")
        return float(kept["since"])

    def due(self, now: float) -> datetime | None:
        """The latest tick at or before now, if the schedule already existed then."""
        tick = croniter(self.cron, utc(now)).get_prev(datetime)
        return tick if tick.timestamp() >= self.since else None

    def next_tick(self, now: float) -> float:
        """When the next tick comes."""
        return croniter(self.cron, utc(now)).get_next(datetime).timestamp()

    def records(self) -> list[dict[str, Any]]:
        """Every tick's decision, oldest first."""
        keys = sorted(k for k in self.storage.list(self._at("ticks")) if k.endswith(".json"))
        return [json.loads(self.storage.read_bytes(k)) for k in keys]

    def step(self, now: float | None = None) -> dict[str, Any] | None:
        """Decide the due tick if nobody has; returns the decision made here (None: nothing to decide)."""
        now = self.clock() if now is None else now
        tick = self.due(now)
        if tick is None:
            return None
        name = tick.strftime(TICK_FORMAT)
        where = self._at("ticks", f"{name}.json")
        if self.storage.exists(where):
            return None
        started = [r for r in self.records() if r["decision"] == "started"]
        previous = started[-1] if started else None
        busy_reason = None
        if previous is not None and self.runner.running(previous["run"]):
            busy_reason = f"the run of tick {previous['tick']} still goes on"
        elif self.lease is not None:  # any run writing the job's output, started here or anywhere else
            holder = live_holder(self.storage, self.lease)
            if holder is not None:
                busy_reason = (f"a {holder.get('what', 'run')} holds {self.lease} (host {holder.get('host', '?')}, pid "
                               f"{holder.get('pid', '?')}, heartbeat {holder['age']:.0f} s ago)")
        busy = busy_reason is not None
        decision = {"tick": name, "decided": utc(now).strftime(TICK_FORMAT), "by": f"pid {os.getpid()}"}
        if busy:
            decision.update(decision="skipped", reason=busy_reason)
        else:
            decision.update(decision="starting")
        # Claimed before anything starts: a second scheduler, or this one restarted, finds the tick decided.
        if self.storage.create(where, json.dumps(decision).encode()) is None:
            return None
        if not busy:
            decision.update(decision="started", run=self.runner.start(self.kind, self.args, name))
            self.storage.write_bytes(where, json.dumps(decision).encode())
        self.log(f"tick {name}: {decision['decision']}"
                 + (f" ({decision['reason']})" if busy else f" {self.kind}: {json.dumps(decision['run'])}"))
        return decision

    def run(self, max_ticks: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        """Decide ticks until interrupted (or until max_ticks decisions were made here)."""
        made = 0
        self.log(f"schedule {self.cron!r} (UTC): {self.kind} {' '.join(self.args)}; state in {self.state}")
        while max_ticks is None or made < max_ticks:
            if self.step() is not None:
                made += 1
                continue
            now = self.clock()
            sleep(max(0.05, min(self.next_tick(now) - now, 60.0)))
