"""The job kinds, in one table: what submit, schedule and the CLI need to know of each Ray job."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from captioning.lease import lease_uri
from jobs import options


@dataclass(frozen=True)
class JobKind:
    """One Ray job: its options, the option naming the folder it writes (and holds the lease of), its module."""

    name: str
    options: Callable[[argparse.ArgumentParser], None]
    output: str  # dest of the option the job writes to: its lease lives there (captioning/lease.py)
    help: str

    @property
    def module(self) -> str:
        """The job's entrypoint module: `python -m MODULE OPTIONS` runs it, locally or on a cluster."""
        return f"jobs.{self.name}"

    @property
    def entrypoint(self) -> list[str]:
        """The command that runs the job, before its options."""
        return ["python", "-m", self.module]

    def lease(self, args: list[str]) -> str | None:
        """Where a run with these options holds its lease: the output option parsed by the job's own options
        (that option alone: the rest may be absent), None when the options name no output."""
        full = argparse.ArgumentParser(add_help=False)
        self.options(full)
        names = next(action.option_strings for action in full._actions if action.dest == self.output)
        only = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        only.add_argument(*names, dest=self.output)
        try:
            parsed, _ = only.parse_known_args(args)
        except (argparse.ArgumentError, SystemExit):
            return None  # the job itself will say what is wrong with its options
        where = getattr(parsed, self.output, None)
        return lease_uri(where) if where else None


JOBS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("batch", options.batch_options, "output", "caption a URL manifest (Ray Data)"),
    JobKind("features", options.features_options, "output", "backbone features of a manifest (Ray Data)"),
    JobKind("train", options.train_options, "out", "train a captioner (Ray Train with --workers)"),
    JobKind("retrain", options.retrain_options, "registry", "evaluation-gated retraining into a registry"),
)}
