"""Per-epoch hooks: early stopping with the best weights, checkpoints, history and curves, samples, time budget."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np

from captioning.atomic import atomic_path, atomic_write
from captioning.plots import plot_history
from captioning.training.loop import Hook, Trainer, TrainState


class EarlyStopping(Hook):
    """Keeps the weights of the epoch with the lowest validation loss; stops after `patience` epochs without one.

    Every worker sees the same (all-reduced) validation loss, so every worker stops at the same epoch.
    """

    def __init__(self, model: keras.Model, patience: int, log: Callable[[str], None] = print) -> None:
        self.model, self.patience, self.log = model, patience, log
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        if row["val_loss"] < state.best_loss:
            state.best_loss, state.best_epoch, state.wait = row["val_loss"], state.epoch, 0
            self.best_weights = self.model.get_weights()
        else:
            state.wait += 1
        if state.wait >= self.patience:
            state.stop = f"early stopping: val_loss has not improved for {self.patience} epochs"
            state.stopped_early = True

    def on_train_end(self, state: TrainState) -> None:
        if not state.history or state.best_epoch < 1:
            return  # nothing trained in this run (a resumed run that had already finished its epochs)
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        best = state.history[state.best_epoch - 1]
        self.log(f"restored the best weights, from epoch {state.best_epoch} (val_loss {best['val_loss']:.4f})")


class Checkpoints(Hook):
    """Last weights, optimizer slots (npz, no pickle), best weights and loop state in one folder, each epoch
    and, with every_steps, every that many steps within one.

    state.json is written last: a folder without it holds no usable checkpoint. Only the writer (rank 0)
    writes; every worker can restore. publish() runs on every worker after each checkpoint (Ray Train reports
    there); here it does nothing.
    """

    def __init__(self, folder: Path, trainer: Trainer, early: EarlyStopping, writer: bool = True,
                 every_steps: int | None = None) -> None:
        self.folder, self.trainer, self.early, self.writer = Path(folder), trainer, early, writer
        self.every_steps = every_steps
        self.last: dict[str, float] = {}  # the last epoch's metrics, reported again with mid-epoch checkpoints

    def exists(self) -> bool:
        """Whether the folder holds a complete checkpoint."""
        return (self.folder / "state.json").exists()

    def restore(self) -> TrainState:
        """Weights, optimizer and state of the last checkpoint; the best weights go back to early stopping."""
        model = self.trainer.model
        if (self.folder / "best.weights.h5").exists():
            model.load_weights(str(self.folder / "best.weights.h5"))
            self.early.best_weights = model.get_weights()
        model.load_weights(str(self.folder / "last.weights.h5"))
        with np.load(self.folder / "optimizer.npz", allow_pickle=False) as saved:
            for i, variable in enumerate(self.trainer.optimizer.variables):
                variable.assign(saved[f"arr_{i}"])
        state = TrainState.from_dict(json.loads((self.folder / "state.json").read_text()))
        if state.history:
            self.last = state.history[-1]
        return state

    def on_step_end(self, state: TrainState) -> None:
        if self.every_steps and state.step % self.every_steps == 0:
            self.save(state)
            self.publish(state, {**self.last, "epoch": state.epoch, "step": state.step})

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        self.last = row
        self.save(state)
        self.publish(state, {**row, "step": 0})

    def save(self, state: TrainState) -> None:
        """Write the checkpoint (the writer only); the best weights only when this epoch is the best."""
        if not self.writer:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        model = self.trainer.model
        if state.best_epoch == state.epoch and state.step == 0:
            with atomic_path(self.folder / "best.weights.h5") as tmp:
                model.save_weights(str(tmp))
        with atomic_path(self.folder / "last.weights.h5") as tmp:
            model.save_weights(str(tmp))
        with atomic_path(self.folder / "optimizer.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, *[v.numpy() for v in self.trainer.optimizer.variables])
        atomic_write(self.folder / "state.json", json.dumps({**state.to_dict(), "stop": None}).encode())

    def publish(self, state: TrainState, metrics: dict[str, float]) -> None:
        """After each checkpoint, on every worker: nothing here (Ray Train reports it)."""


class History(Hook):
    """history.csv, history.json and training_curves.png in the model folder, rewritten each epoch."""

    def __init__(self, out: Path, writer: bool = True) -> None:
        self.out, self.writer = Path(out), writer

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        if self.writer:
            write_history(self.out, state.history)


class SampleCaption(Hook):
    """One caption per epoch for a fixed validation image: training progress anyone can read."""

    def __init__(self, caption: Callable[[], str], name: str, log: Callable[[str], None] = print) -> None:
        self.caption, self.name, self.log = caption, name, log

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        self.log(f"  sample for {self.name}: {self.caption()}")


class TimeBudget(Hook):
    """Ends the run after the epoch during which the wall-clock budget ran out.

    Each worker reads its own clock; agree() shares the verdict, so every worker stops at the same epoch.
    """

    def __init__(self, seconds: float | None, agree: Callable[[bool], bool] = bool) -> None:
        self.seconds, self.agree = seconds, agree
        self.started = time.monotonic()

    def on_train_begin(self, state: TrainState) -> None:
        self.started = time.monotonic()

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        if self.seconds is None or state.stop:
            return
        if self.agree(time.monotonic() - self.started > self.seconds):
            state.stop = f"time budget of {self.seconds:.0f} s used up after epoch {state.epoch}"


def write_history(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """history.csv, history.json and training_curves.png in the model directory."""
    if not history:
        return
    with atomic_path(out / "history.csv") as tmp, open(tmp, "w", newline="") as handle:
        names = list(dict.fromkeys(name for row in history for name in row))  # some columns only in some rows
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
    atomic_write(out / "history.json", json.dumps(list(history), indent=2).encode())
    with atomic_path(out / "training_curves.png") as tmp:
        plot_history(history, tmp)
