"""Connecting to Ray, the same way for every job."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from captioning.errors import CaptioningError, captioning_cause

# Fetch and write tasks mostly wait on the network and storage. Ray Data gives each task operator a share of the
# CPUs the actors leave: at 0.25 that share ran one or two fetch tasks at a time on 2 cores ("backpressured:
# tasks(ResourceBudget)") and the caption actor waited on fetching (CC-shaped, 2026-12-03: 518 rows/s, actor busy 51%).
TASK_CPUS = 0.1
# Every worker of our jobs starts as quietly as the command (captioning.console): no TensorFlow start-up lines.
WORKER_SETUP = "captioning.console.quiet_worker"
CONNECT_TIMEOUT = 60.0  # seconds an --address may take to answer


def cluster_address(address: str | None) -> str | None:
    """host:port of the GCS to join, or None for a fresh local Ray.

    None: the cluster of a submitted job (Ray gives its driver RAY_ADDRESS), else local, never whatever cluster
    this machine last ran (Ray's own default reads /tmp/ray/ray_current_cluster, which a killed head leaves
    behind). `auto`: the cluster last started on this machine, as Ray records it.
    """
    given = os.environ.get("RAY_ADDRESS", "")
    # An http:// RAY_ADDRESS is a job API address (for `jobs submit`), not a cluster to join.
    address = address or (given if given and "://" not in given else None)
    if address is None or address == "local":
        return None
    if address == "auto":
        # Only what `ray start` recorded (Ray's own "auto" also joins any Ray process it finds running, which on a
        # shared machine may be somebody else's).
        from ray._private.services import find_bootstrap_address  # noqa: PLC0415

        found = find_bootstrap_address(None)
        if not found:
            raise CaptioningError("--address auto", "no Ray cluster was started on this machine (`ray start "
                                  "--head` starts one; without --address a local Ray runs in this process)")
        return found
    return address


def wait_reachable(address: str, timeout: float, shown: str | None = None) -> None:
    """Return once something listens at host:port; one clear error after `timeout` seconds (Ray itself would
    retry for minutes, printing a line every few seconds)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise CaptioningError(shown or address, "expected HOST:PORT of a Ray cluster's GCS, or auto")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise CaptioningError(shown or address, f"no Ray cluster answers at {address} (tried for "
                                      f"{timeout:.0f} s: {err.strerror or err}); check the address, or leave "
                                      "--address out to run on a local Ray") from None
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


def quiet_ray_logging() -> None:
    """Ray's console notices (token auth, Ray Data's execution plan) are not the job's progress: hidden unless
    --verbose. Before Ray Data is first imported (Ray Train imports it), since it reads its config then."""
    from captioning import console  # noqa: PLC0415

    if console.verbose():
        return
    for name in ("ray", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))


def connect(address: str | None, log_to_driver: bool = False, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Join the cluster at address (see cluster_address), or start a fresh local Ray. Returns whether it joined a
    cluster.

    Workers inherit this environment, AWS settings included. log_to_driver: show workers' output here (training
    prints its epochs from rank 0); off for Ray Data jobs, which report through their own progress bar.
    """
    quiet_ray_logging()
    import ray  # noqa: PLC0415

    target = cluster_address(address)
    if target is not None:
        wait_reachable(target, timeout, shown=f"--address {address}" if address else "RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=target or "local", include_dashboard=target is not None, logging_level="ERROR",
                 log_to_driver=log_to_driver, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": WORKER_SETUP})
    return target is not None


def outage_error(err: BaseException, committed: int, total: int) -> BaseException:
    """A storage outage longer than the retry window, from whichever task met it, as one error that says how
    far the job got and that a rerun resumes; any other error as it was."""
    cause = captioning_cause(err)
    if cause is None or cause.reason != "unavailable":
        return err
    return CaptioningError(cause.source, f"{cause.message}; {committed} of {total} shards are committed, and "
                           "rerunning the same command resumes from them", "unavailable")
