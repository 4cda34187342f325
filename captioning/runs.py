"""The settings a training run was started with, kept beside its output, so a rerun into the same --out either
resumes that very run or says what differs; it never mixes two runs' weights.

`<out>/run.json` records everything that changes what a run computes: the data (by content), the columns, the
model shape, the backbone, the optimiser, the batch, the seeds, the precision and the worker count. A rerun
with equal settings resumes; a larger --epochs continues; anything else is one error naming each difference.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Callable

from captioning.config import TrainConfig
from captioning.errors import CaptioningError
from captioning.storage import Storage

RUN_FILE = "run.json"
RUN_FORMAT = 1


def _data(source: str, storage: Storage) -> dict[str, Any]:
    """A split by content: a manifest's bytes fingerprint, or a feature set's backbone and committed shards."""
    from captioning.featureset import FeatureSet  # noqa: PLC0415

    if FeatureSet.is_feature_set(source, storage):
        made = FeatureSet(source, storage)
        return {"source": source, "content": f"features {made.backbone['fingerprint']}, {len(made.shards)} shards, "
                                             f"{made.pairs} captions"}
    from captioning.output_source import bulk_output_format, check_source, describe_source  # noqa: PLC0415

    output = bulk_output_format(source, storage)
    if output is not None:
        check_source(source, storage)  # before any work: a Parquet or unfinished output is refused here
    elif not storage.exists(source):
        raise CaptioningError(source, "manifest not found")
    described = describe_source(source, storage, output)
    fingerprint = described.get("sha256") or str(described.get("etag", "")).strip('"')
    return {"source": source, "content": f"{described['bytes']} bytes, {str(fingerprint)[:16]}"}


def run_settings(train_source: str, val_source: str, config: TrainConfig, spec: Any, workers: int,
                 storage: Storage) -> dict[str, Any]:
    """What a run computes from, under the option names a user would change (--train, --d-model, ...)."""
    model = config.model
    warm = config.warm_start
    return {
        "--train": _data(train_source, storage), "--val": _data(val_source, storage),
        "columns": asdict(spec) if spec is not None else None,
        "--vocab-size": model.vocab_size, "--max-length": model.max_length, "--d-model": model.d_model,
        "--layers": model.num_layers, "--heads": model.num_heads, "--dropout": model.dropout,
        "ff_multiplier": model.ff_multiplier, "--backbone": model.backbone, "--weights": config.weights,
        "--backbone-seed": config.backbone_seed if config.weights == "none" else None,
        "--learning-rate": config.learning_rate, "--batch-size": config.batch_size, "--seed": config.seed,
        "--shuffle-buffer": config.shuffle_buffer, "--patience": config.patience,
        "--steps-per-epoch": config.steps_per_epoch, "--precision": config.precision, "--workers": workers,
        "warm start": warm,
        "--epochs": config.epochs,
        # The batch order depends on it (padding and XLA do not change what a step computes). Left out when
        # unset, so runs recorded before the option existed still resume.
        **({"--no-group-by-image": True} if not config.group_by_image else {}),
    }


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "content" in value:
        return f"{value['source']} ({value['content']})"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, dict) and isinstance(new, dict) and "content" in old and "content" in new:
        return old["content"] == new["content"]  # the same data moved or named differently is the same data
    return old == new


def differences(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """`name: old -> new` for each setting that differs; a larger --epochs is not a difference (it continues)."""
    changed = []
    for name in dict.fromkeys([*recorded, *settings]):
        old, new = recorded.get(name), settings.get(name)
        if name == "--epochs" and isinstance(old, int) and isinstance(new, int) and new >= old:
            continue
        if not _same(old, new):
            changed.append(f"{name} {_shown(old)} -> {_shown(new)}")
    return changed


def claim_run(out: str, settings: dict[str, Any], storage: Storage, restart: bool,
              discard: Callable[[], None], log: Callable[[str], None] = print) -> bool:
    """Before anything is written to out: resume the run recorded there when its settings are these, refuse
    when they differ (one error, files untouched), or with restart discard it. Returns whether a run resumes."""
    location = f"{out.rstrip('/')}/{RUN_FILE}"
    recorded = json.loads(storage.read_bytes(location)) if storage.exists(location) else None
    if recorded is not None:
        changed = differences(recorded.get("settings", {}), settings)
        if changed and not restart:
            raise CaptioningError(out, f"holds a run with other settings: {'; '.join(changed)}. Rerun with its "
                                  "settings to resume it, add --restart to discard it and start over, or choose "
                                  "another --out", "settings_changed")
        if changed or restart:
            log(f"--restart: discarding the run in {out} ({'; '.join(changed) or 'same settings'})")
            discard()
            recorded = None
    record = {"format": RUN_FORMAT, "settings": settings,
              "started": recorded["started"] if recorded else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if record != recorded:
        storage.write_bytes(location, json.dumps(record, indent=2).encode())
    return recorded is not None
