"""Connecting to Ray, the same way for every job."""

from __future__ import annotations

import os

TASK_CPUS = 0.25  # fetch and write tasks mostly wait on the network and storage


def connect(address: str | None, log_to_driver: bool = False) -> bool:
    """Join the cluster at address, or the cluster of a submitted job (Ray sets RAY_ADDRESS for its driver), or
    start a fresh local Ray (never whatever cluster this machine last ran). Returns whether it joined a cluster.

    Workers inherit this environment, AWS settings included. log_to_driver: show workers' output here (training
    prints its epochs from rank 0); off for Ray Data jobs, which report through their own progress bar.
    """
    import ray  # noqa: PLC0415

    given = os.environ.get("RAY_ADDRESS", "")
    # A job's driver gets the cluster's GCS address; an http:// one is a job API address for `jobs submit`.
    address = address or (given if given and "://" not in given else None)
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=bool(address), logging_level="ERROR",
                 log_to_driver=log_to_driver, configure_logging=False)
    return address is not None
