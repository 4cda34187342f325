"""Connecting to Ray, the same way for every job."""

from __future__ import annotations

TASK_CPUS = 0.25  # fetch and write tasks mostly wait on the network and storage


def connect(address: str | None, log_to_driver: bool = False) -> None:
    """Join the cluster at address, or start a fresh local Ray (never whatever cluster this machine last ran).

    Workers inherit this environment, AWS settings included. log_to_driver: show workers' output here (training
    prints its epochs from rank 0); off for Ray Data jobs, which report through their own progress bar.
    """
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=bool(address), logging_level="ERROR",
                 log_to_driver=log_to_driver, configure_logging=False)
