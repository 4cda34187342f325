"""`captioning jobs submit|status|logs|stop|list`: the Ray jobs on a cluster, through ops/submit.py."""

from __future__ import annotations

import argparse
import sys

from captioning.errors import CaptioningError
from jobs.kinds import JOBS
from jobs.options import log, result, non_negative

ADDRESS_HELP = "the cluster's Ray dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"


def register(commands: argparse._SubParsersAction) -> None:
    """Add the jobs command group."""
    group = commands.add_parser("jobs", help="submit batch, features and train jobs to a Ray cluster and follow them")
    actions = group.add_subparsers(dest="action", required=True)

    submit = actions.add_parser(
        "submit", help="submit a job: captioning jobs submit KIND [options] -- <the local command's options>",
        usage=f"captioning jobs submit {{{','.join(JOBS)}}} [options] -- <options of `captioning KIND`>",
        description="Runs `python -m jobs.KIND <options>` on the cluster: the same code and options as the local "
                    "command. Storage credentials (AWS_*) travel as the job's environment, never in its options.")
    submit.add_argument("kind", choices=list(JOBS),
                        help="the job: the local command of that name, run on the cluster")
    submit.add_argument("--address", default=None, help=ADDRESS_HELP)
    submit.add_argument("--name", default=None, help="a name to show in `jobs list` (default: the job id)")
    submit.add_argument("--wait", action="store_true", help="stream the job's log until it ends; exit 1 unless it "
                        "succeeded")
    submit.add_argument("--record", default=None, metavar="URI",
                        help="also keep the job's record under this folder or s3:// prefix (for `jobs list`)")
    submit.add_argument("--code", choices=["checkout", "image"], default="checkout",
                        help="checkout: send this checkout's code (captioning/, jobs/) with the job (default); "
                             "image: use the package installed in the cluster's image")
    submit.add_argument("--pip", action="store_true",
                        help="have Ray install the pinned dependencies for the job (default: the image has them)")
    submit.add_argument("--no-credentials", action="store_true",
                        help="do not forward AWS_* from here (the cluster has its own: instance role, secret)")
    submit.add_argument("--entrypoint-cpus", type=non_negative, default=None,
                        help="CPUs reserved for the job's driver (default: none, it runs on the head)")
    submit.set_defaults(handler=run_submit)

    for name, helptext in (("status", "a job's state"), ("logs", "a job's log"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=helptext)
        action.add_argument("job_id", help="the id `jobs submit` printed (or the --name given)")
        action.add_argument("--address", default=None, help=ADDRESS_HELP)
        action.add_argument("--record", default=None, metavar="URI", help="update the job's record there too")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
        action.set_defaults(handler={"status": run_status, "logs": run_logs, "stop": run_stop}[name])

    listing = actions.add_parser("list", help="jobs on the cluster and/or in a record prefix")
    listing.add_argument("--address", default=None, help=ADDRESS_HELP + "; with --record, only when given")
    listing.add_argument("--record", default=None, metavar="URI",
                         help="list the records there (works after the cluster is gone)")
    listing.set_defaults(handler=run_list)


def _records(args: argparse.Namespace):  # noqa: ANN202
    from ops.submit import JobRecords  # noqa: PLC0415

    return JobRecords(args.record) if args.record else None


def run_submit(args: argparse.Namespace) -> int:
    """captioning jobs submit: submit, record, and with --wait follow to the end."""
    from ops.submit import Cluster, Submission, record_for  # noqa: PLC0415

    if args.passed is None:
        raise CaptioningError("jobs submit", f"put the job's options after `--`: captioning jobs submit {args.kind} "
                              f"--address ... -- <options of `captioning {args.kind}`>")
    from ops.submit import check_args, check_secrets  # noqa: PLC0415

    job_args = args.passed
    check_args(args.kind, job_args)
    if args.name is not None:
        check_secrets("jobs submit --name", [args.name])
    submission = Submission(args.kind, job_args, name=args.name, code=args.code, pip=args.pip,
                            forward_credentials=not args.no_credentials, entrypoint_cpus=args.entrypoint_cpus)
    records = _records(args)
    if records:
        records.probe()  # a record that cannot be written fails now, not after the job runs without one
    cluster = Cluster(args.address)
    job_id = cluster.submit(submission)
    if records:
        records.put(record_for(submission, job_id, cluster.address))
    if not args.wait:
        log(f"follow it with: captioning jobs logs {job_id} --follow")
        return 0
    cluster.follow(job_id, lambda chunk: print(chunk, end="", flush=True))
    state, message = cluster.wait(job_id)
    if records:
        records.update(job_id, state, message)
    if state != "SUCCEEDED":
        raise CaptioningError(job_id, f"{state}: {message}".strip(": "))
    result(f"{job_id} SUCCEEDED")
    return 0


def run_status(args: argparse.Namespace) -> int:
    """captioning jobs status: the state and Ray's message; exit 0 unless the job failed or was stopped."""
    from ops.submit import Cluster  # noqa: PLC0415

    state, message = Cluster(args.address).status(args.job_id)
    records = _records(args)
    if records:
        records.update(args.job_id, state, message)
    result(f"{args.job_id}\t{state}" + (f"\t{message}" if message else ""))
    return 0 if state not in ("FAILED", "STOPPED") else 1


def run_logs(args: argparse.Namespace) -> int:
    """captioning jobs logs: the log so far, or streamed with --follow."""
    from ops.submit import Cluster  # noqa: PLC0415

    cluster = Cluster(args.address)
    if args.follow:
        cluster.follow(args.job_id, lambda chunk: print(chunk, end="", flush=True))
    else:
        sys.stdout.write(cluster.logs(args.job_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """captioning jobs stop."""
    from ops.submit import Cluster  # noqa: PLC0415

    cluster = Cluster(args.address)
    stopped = cluster.stop(args.job_id)
    result(f"{args.job_id}: " + ("stop requested" if stopped else "had already ended"))
    records = _records(args)
    if records:
        try:  # a stop takes a moment: record the end, not the RUNNING before it
            state, message = cluster.wait(args.job_id, timeout=60)
        except CaptioningError:
            state, message = cluster.status(args.job_id)
        records.update(args.job_id, state, message)
    return 0


def run_list(args: argparse.Namespace) -> int:
    """captioning jobs list: the cluster's jobs, the records, or both (records refreshed from the cluster)."""
    from ops.submit import Cluster  # noqa: PLC0415

    records = _records(args)
    rows: dict[str, dict[str, str]] = {}
    if records:
        for record in records.all():
            rows[record.job_id] = {"job_id": record.job_id, "kind": record.kind, "name": record.name,
                                   "state": record.state, "submitted_at": record.submitted_at,
                                   "commit": record.commit[:12] + ("+dirty" if record.dirty == "true" else ""),
                                   "message": record.message}
    if args.address or not records:  # records alone: what ran, even after the cluster is gone
        for row in Cluster(args.address).jobs():
            if records and row["job_id"] in rows:
                records.update(row["job_id"], row["state"], row["message"])
            rows[row["job_id"]] = {**rows.get(row["job_id"], {}), **{k: v for k, v in row.items() if v}}
    columns = ("job_id", "kind", "state", "submitted_at", "commit", "name")
    table = [columns] + [tuple(row.get(c, "") for c in columns)
                         for row in sorted(rows.values(), key=lambda r: r.get("submitted_at", ""))]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        result("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0
