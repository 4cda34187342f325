"""`captioning schedule`: a long-lived scheduler that runs a job (retrain by default) on each cron tick."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from captioning.errors import CaptioningError
from jobs.kinds import JOBS
from jobs.options import log, positive


def register(commands: argparse._SubParsersAction) -> None:
    """Add schedule."""
    schedule = commands.add_parser(
        "schedule", help="run a job on a cron schedule: captioning schedule --cron EXPR --state URI -- <options>",
        usage="captioning schedule --cron EXPR --state URI [--kind retrain] [--address ADDR] -- <options of the job>")
    schedule.add_argument("--cron", required=True, help='cron expression in UTC, e.g. "0 3 * * *": five fields, or '
                          "six with seconds last")
    schedule.add_argument("--state", required=True, metavar="URI",
                          help="folder or s3:// prefix for the schedule's decisions (a restart reads them)")
    schedule.add_argument("--kind", default="retrain", choices=list(JOBS),
                          help="which job each tick runs")
    schedule.add_argument("--address", default=None,
                          help="submit each run to this Ray cluster (http://HEAD:8265) instead of running it here")
    schedule.add_argument("--code", choices=["checkout", "image"], default="checkout",
                          help="with --address: what code the job runs (see `jobs submit`)")
    schedule.add_argument("--logs", default="runs/schedule", help="where local runs write their logs")
    schedule.add_argument("--max-ticks", type=positive, default=None, help="stop after deciding this many ticks")
    schedule.set_defaults(handler=run_schedule)


def run_schedule(args: argparse.Namespace) -> int:
    """captioning schedule: until Ctrl+C / SIGTERM (or --max-ticks)."""
    from ops.schedule import ClusterRunner, LocalRunner, Scheduler  # noqa: PLC0415
    from ops.submit import check_args  # noqa: PLC0415

    if args.passed is None:
        raise CaptioningError("schedule", f"put the job's options after `--`: captioning schedule --cron ... "
                              f"--state ... -- <options of `captioning {args.kind}`>")
    check_args(args.kind, args.passed)  # a typo fails now, not at 3 a.m.
    runner = ClusterRunner(args.address, args.code) if args.address else LocalRunner(Path(args.logs))
    scheduler = Scheduler(args.cron, args.state, args.kind, args.passed, runner)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        scheduler.run(args.max_ticks)
    except KeyboardInterrupt:
        log("scheduler stopped; a restart with the same --state goes on from its decisions")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
