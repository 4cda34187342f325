"""Sharded training on Ray Train: TensorflowTrainer, MultiWorkerMirroredStrategy and the library's custom step.

The driver makes the feature sets (on Ray Data, when given manifests) and the vocabulary once; every worker
then runs captioning.train.fit on its own shards, with one more hook: each checkpoint is reported to Ray
Train, which keeps the best ones in RunConfig.storage_path and restores from the latest after a failure or
when the same command runs again. Rank 0 writes the bundle, history and curves to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from captioning.config import Scaling, TrainConfig
from captioning import console
from captioning.console import LEVEL_ENV, VERBOSE_ENV
from captioning.errors import CaptioningError
from captioning.manifest import ManifestSpec
from captioning.lease import leased
from jobs.options import guarded, job_parser, log, manifest_spec, result, show_progress, train_config, train_options
from captioning.runs import claim_run, run_settings
from jobs.options import log as options_log
from jobs.options import scaling as scaling_of
from captioning.storage import Storage, absolute, is_s3
from jobs.ray_setup import CONNECT_TIMEOUT, WORKER_SETUP, connect, quiet_ray_logging

RUN_NAME = "checkpoints"  # the Ray Train run folder under --out; the same --out resumes it


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore from the latest reported checkpoint, train, report, rank 0 writes out."""
    import ray.train  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from captioning.train import Prepared, fit, write_model  # noqa: PLC0415
    from captioning.training.hooks import Checkpoints  # noqa: PLC0415

    tf.get_logger().setLevel("ERROR")  # MultiWorkerMirroredStrategy's start-up INFO lines, once per worker
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config: TrainConfig = loop_config["config"]
    gpus = loop_config["gpus_per_worker"] > 0
    # NCCL between GPUs, ring all-reduce over gRPC between CPU workers.
    implementation = tf.distribute.experimental.CommunicationImplementation.NCCL if gpus else \
        tf.distribute.experimental.CommunicationImplementation.RING
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
    prepared = Prepared(**loop_config["prepared"], storage=Storage(config.storage))

    if rank == 0:  # rank 0 speaks for the run: its lines reach the driver's log with levels and timestamps
        console.setup(os.environ.get(LEVEL_ENV) or ("debug" if console.verbose() else "info"))

    def log(message: str) -> None:
        if rank == 0:
            options_log(message)

    class Reported(Checkpoints):
        """Every worker reports each checkpoint's metrics; rank 0 hands over the checkpoint folder too."""

        def publish(self, state, metrics):  # noqa: ANN001, ANN202
            from ray.train import Checkpoint  # noqa: PLC0415

            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            clean.setdefault("val_loss", float("inf"))  # a checkpoint before the first validation ranks last
            clean["restores"] = state.restores
            ray.train.report(clean, checkpoint=Checkpoint.from_directory(self.folder) if self.writer else None,
                             delete_local_checkpoint_after_upload=False)

    with tempfile.TemporaryDirectory(prefix="captioning-ckpt-") as tmp:
        folder = Path(tmp) / "checkpoint"
        restored = ray.train.get_checkpoint()
        if restored is not None:
            restored.to_directory(str(folder))
        model, state = fit(prepared, config, folder, None, strategy, pipelines=world, rank=rank,
                           checkpoints=Reported, log=log, progress=False)
    if rank == 0:
        version = write_model(prepared, model, state, loop_config["out"])
        log(f"model {version} written to {loop_config['out']} (best epoch {state.best_epoch}, "
            f"{state.restores} restore(s))")


def run(train_source: str, val_source: str, out: str, config: TrainConfig, scaling: Scaling,
        spec: ManifestSpec | None = None, address: str | None = None, log: Callable[[str], None] = print,
        progress: bool = True, restart: bool = False, connect_timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
    """Train on Ray Train into out (folder or s3:// prefix), resuming the run recorded there when its settings
    are these (restart: discard it); returns the bundle's metrics."""
    out = out if is_s3(out) else absolute(out)
    storage = Storage(config.storage)
    storage.check_writable(out)  # before the cluster, the features and the epochs
    with leased(storage, out, "Ray Train run", log):  # one run per --out
        return _run(train_source, val_source, out, config, scaling, spec, address, log, progress, restart,
                    connect_timeout, storage)


def _run(train_source: str, val_source: str, out: str, config: TrainConfig, scaling: Scaling,
         spec: ManifestSpec | None, address: str | None, log: Callable[[str], None], progress: bool, restart: bool,
         connect_timeout: float, storage: Storage) -> dict[str, Any]:
    quiet_ray_logging()  # before ray.train, which imports Ray Data
    import ray.train  # noqa: PLC0415
    from ray.train.tensorflow import TensorflowTrainer  # noqa: PLC0415

    from captioning.train import prepare  # noqa: PLC0415
    from jobs import features as features_job  # noqa: PLC0415

    train_source = train_source if is_s3(train_source) else absolute(str(train_source))
    val_source = val_source if is_s3(val_source) else absolute(str(val_source))
    settings = run_settings(train_source, val_source, config, spec or ManifestSpec(), scaling.workers, storage)
    claim_run(out, settings, storage, restart, lambda: storage.delete_tree(f"{out.rstrip('/')}/{RUN_NAME}"), log)
    connect(address, log_to_driver=True, timeout=connect_timeout)

    def make(features, backbone) -> None:  # noqa: ANN001  (manifests: the features job, on this cluster)
        features_job.run(features, address=address, log=log, connect_timeout=connect_timeout, progress=progress,
                         backbone=backbone)

    prepared = prepare(train_source, val_source, config, spec, config.cache_dir or f"{out.rstrip('/')}/features",
                       make=make, log=log, progress=progress, workers=scaling.workers)
    per_worker = config.batch_size // scaling.workers
    log(f"Ray Train: {scaling.workers} worker(s) x {scaling.cpus_per_worker:g} CPU"
        + (f" + {scaling.gpus_per_worker:g} GPU" if scaling.gpus_per_worker else "")
        + f"; global batch {config.batch_size} ({per_worker} per worker), learning rate {config.learning_rate:g}")
    storage_path, filesystem = storage.arrow_location(out)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {})}
    trainer = TensorflowTrainer(
        worker_loop,
        train_loop_config={"config": config, "prepared": prepared.to_dict(), "out": out,
                           "gpus_per_worker": scaling.gpus_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.keep_checkpoints,
                                                         checkpoint_score_attribute="val_loss",
                                                         checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": worker_env(), "worker_process_setup_hook": WORKER_SETUP}),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001  (Ray wraps a worker's error in its own types)
        raise CaptioningError(out, f"training failed: {str(err).strip().splitlines()[-1][:500]}") from None
    if result.error is not None:
        raise CaptioningError(out, f"training failed: {result.error}")
    bundle = json.loads(storage.read_bytes(f"{out.rstrip('/')}/bundle.json"))
    return {"version": bundle["version"], **bundle["metrics"],
            "history": json.loads(storage.read_bytes(f"{out.rstrip('/')}/history.json"))}


def worker_env() -> dict[str, str]:
    """Settings workers need beside what Ray passes on: quiet TensorFlow, and the S3 endpoint if one is set
    (credentials come from the workers' own environment or instance role, never through job metadata)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
    names += (VERBOSE_ENV, LEVEL_ENV)
    return {"TF_CPP_MIN_LOG_LEVEL": "2", **{name: os.environ[name] for name in names if os.environ.get(name)}}


def command(args: argparse.Namespace) -> int:
    """`captioning train` and `python -m jobs.train`: in this process, or on Ray Train with --workers."""
    config, scale, spec = train_config(args), scaling_of(args), manifest_spec(args)
    if scale.workers:
        metrics = run(args.train, args.val, args.out, config, scale, spec, args.address, log=log,
                      progress=show_progress(args), restart=args.restart, connect_timeout=args.connect_timeout)
        result(f"model {metrics['version']} written to {args.out} (best epoch {metrics['best_epoch']}, "
               f"{metrics['restores']} restore(s))")
        return 0
    from captioning.train import train  # noqa: PLC0415

    done = train(args.train, args.val, args.out, config, spec, progress=show_progress(args), log=log,
                 restart=args.restart)
    result(f"model {done.version} written to {done.bundle} (best epoch {done.best_epoch})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a submitted training job: the local command's options, one `error:` line on failure."""
    args = job_parser("python -m jobs.train", __doc__, train_options).parse_args(argv)
    return guarded(lambda: command(args), args)


if __name__ == "__main__":
    sys.exit(main())
