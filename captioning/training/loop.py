"""The custom training step under strategy.run, and the epoch loop that calls hooks after every epoch."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from captioning.config import TrainConfig
from captioning.console import progress as progress_bar
from captioning.errors import CaptioningError
from captioning.model import Captioner
from captioning.text import PAD, RESERVED, UNK


# Labels that are not scored: padding, and [UNK] (a word outside the vocabulary). The model may never emit
# [UNK] (its logit is banned), so its loss would be ~1e9 per token: one rare word would drown the epoch's loss.
UNSCORED = tuple(RESERVED.index(token) for token in (PAD, UNK))


def masked_loss(labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Summed cross-entropy, token count and correct predictions over the scored labels (not padding, not
    out-of-vocabulary words), and how many labels were out of the vocabulary."""
    labels = tf.cast(labels, tf.int64)  # Keras can hand labels over as float
    logits = tf.cast(logits, tf.float32)  # mixed precision: the softmax in full precision
    scored = tf.reduce_all(tf.stack([labels != token for token in UNSCORED]), axis=0)
    mask = tf.cast(scored, tf.float32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    # Selected, not multiplied: in float16 a banned token's bias is -inf, so an unscored label's loss is inf,
    # and inf x 0 would be NaN.
    loss = tf.where(scored, loss, 0.0)
    correct = tf.cast(tf.argmax(logits, axis=-1) == labels, tf.float32)
    unknown = tf.cast(labels == RESERVED.index(UNK), tf.float32)
    return tf.reduce_sum(loss), tf.reduce_sum(mask), tf.reduce_sum(correct * mask), tf.reduce_sum(unknown)


class Totals:
    """An epoch's sums of masked_loss, in float64: at a million tokens a float32 sum rounds away changes of the
    mean loss below ~1e-3, and early stopping would compare rounding noise."""

    def __init__(self) -> None:
        self.sums = np.zeros(4, np.float64)  # loss, scored tokens, correct, out-of-vocabulary labels

    def add(self, loss_sum: Any, count: Any, correct: Any, unknown: Any) -> None:
        """One step's sums (each batch's own sum is float32; they are small)."""
        self.sums += np.array([float(loss_sum), float(count), float(correct), float(unknown)], np.float64)

    @property
    def tokens(self) -> float:
        """Scored label tokens."""
        return float(self.sums[1])

    @property
    def loss(self) -> float:
        """Mean cross-entropy per scored token."""
        return float(self.sums[0] / max(self.sums[1], 1.0))

    @property
    def accuracy(self) -> float:
        """Share of scored tokens predicted right."""
        return float(self.sums[2] / max(self.sums[1], 1.0))

    @property
    def oov_share(self) -> float:
        """Share of the labels (padding aside) that are [UNK]: words the vocabulary lacks, unscored."""
        return float(self.sums[3] / max(self.sums[1] + self.sums[3], 1.0))


def use_xla(setting: str) -> bool:
    """--xla: on, off, or auto (on when a GPU is visible: on the 2-core CPUs measured, XLA made a step slower)."""
    return setting == "on" or (setting == "auto" and bool(tf.config.list_physical_devices("GPU")))


class Trainer:
    """Owns the model, optimizer and strategy; run_epoch drives the step functions under strategy.run."""

    def __init__(self, model: Captioner, config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
        self.model, self.config, self.strategy = model, config, strategy
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
        self.loss_scaling = model.dtype_policy.compute_dtype == "float16"
        with strategy.scope():
            self.optimizer = keras.optimizers.Adam(config.learning_rate)
            if self.loss_scaling:
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(model.trainable_variables)
        # XLA compiles each replica's forward and backward pass (one program per batch shape); the gradient
        # all-reduce and the optimizer update stay outside it, where every strategy's collectives work.
        self.xla = use_xla(config.xla)
        self._gradients = tf.function(self._replica_gradients, jit_compile=self.xla)
        self._scores = tf.function(self._replica_scores, jit_compile=self.xla)
        self._train_step = tf.function(self._distributed(self._train_replica))
        self._eval_step = tf.function(self._distributed(self._eval_replica))
        self.traces: dict[str, list[tuple]] = {"train": [], "eval": []}  # the batch shapes each step was traced for

    def _distributed(self, replica_fn: Callable) -> Callable:
        @tf.autograph.experimental.do_not_convert
        def step(batch):
            sums = self.strategy.run(replica_fn, args=(batch,))
            return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) for s in sums]
        return step

    @staticmethod
    def _shapes(batch) -> tuple:
        return tuple(tuple(t.shape) for t in tf.nest.flatten(batch))

    def _replica_gradients(self, batch):
        inputs, labels = batch
        with tf.GradientTape() as tape:
            logits = self.model(inputs, training=True)
            sums = masked_loss(labels, logits)
            # Mean over this replica's tokens; gradients from replicas are summed, hence the division.
            loss = sums[0] / tf.maximum(sums[1], 1.0) / self.strategy.num_replicas_in_sync
            if self.loss_scaling:
                loss = self.optimizer.scale_loss(loss)
        return tape.gradient(loss, self.model.trainable_variables), sums

    def _replica_scores(self, batch):
        inputs, labels = batch
        return masked_loss(labels, self.model(inputs, training=False))

    def _train_replica(self, batch):
        self.traces["train"].append(self._shapes(batch))  # runs once per trace, not per step
        grads, sums = self._gradients(batch)
        # LossScaleOptimizer unscales, and skips a step whose gradients overflowed (then lowers the scale).
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return sums

    def _eval_replica(self, batch):
        self.traces["eval"].append(self._shapes(batch))
        return self._scores(batch)

    def distribute(self, input_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]):  # noqa: ANN201
        """A distributed dataset: input_fn builds each input pipeline's per-replica batches."""
        return self.strategy.distribute_datasets_from_function(input_fn)

    def agree(self, flag: bool) -> bool:
        """True on every worker when any worker says so: decisions from local clocks must be shared."""
        if self.strategy.num_replicas_in_sync == 1:
            return flag
        value = self.strategy.run(lambda: tf.constant(float(flag)))
        return bool(self.strategy.reduce(tf.distribute.ReduceOp.MAX, value, axis=None).numpy() > 0)

    def run_epoch(self, batches: Iterator, train: bool, steps: int, desc: str, progress: bool, skip: int = 0,
                  on_step: Callable[[int], None] | None = None) -> dict:
        """`steps` batches from an iterator over a distributed dataset; the first `skip` are read but not trained
        on (a resume mid-epoch). Returns mean masked loss and accuracy, how many label tokens they cover, the
        share of labels outside the vocabulary, and the seconds spent waiting for input."""
        step_fn = self._train_step if train else self._eval_step
        totals = Totals()
        waited = 0.0
        bar = progress_bar(steps, desc, "batches", progress, leave=False, initial=skip)
        for i in range(steps):
            began = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - began
            if i < skip:
                continue
            totals.add(*step_fn(batch))
            bar.update(1)
            bar.set_postfix(loss=f"{totals.loss:.3f}", acc=f"{totals.accuracy:.3f}")
            if on_step is not None:
                on_step(i + 1)
        bar.close()
        return {"loss": totals.loss, "accuracy": totals.accuracy, "tokens": totals.tokens,
                "oov": totals.oov_share, "input_wait": waited}


@dataclass
class TrainState:
    """Where a run stands; saved with every checkpoint, so a resumed run goes on where it stopped."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    wait: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stop: str | None = None  # why the loop ends early, set by a hook
    stopped_early: bool = False
    step: int = 0  # steps done in the current epoch: a checkpoint taken mid-epoch resumes after them
    restores: int = 0  # how often this run went on from a checkpoint (a resumed run, a replaced worker)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        """Inverse of to_dict (older checkpoints lack the newer fields)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class Hook:
    """Per-epoch work beside the loop (callback style): early stopping, checkpoints, history, reporting."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first epoch of this run (after a resume, too)."""

    def on_step_end(self, state: TrainState) -> None:
        """After each training step (state.step of the epoch done)."""

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        """After each epoch's training and validation; set state.stop to end the loop."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last epoch, whatever ended the loop."""


@dataclass
class EpochLoop:
    """Train and validate epoch after epoch; everything else an epoch triggers is a hook, in order."""

    trainer: Trainer
    epochs: int
    hooks: Sequence[Hook]
    log: Callable[[str], None] = print
    progress: bool = True

    def run(self, train_data, val_data, steps: int, val_steps: int, state: TrainState,
            examples_per_step: int = 0) -> TrainState:
        """Epochs from state.epoch to self.epochs, unless a hook stops the run first."""
        for hook in self.hooks:
            hook.on_train_begin(state)

        first_step: dict[str, float] = {}  # when this run's first step finished; reported once

        def on_step(done: int) -> None:
            first_step.setdefault("at", time.time())
            state.step = done
            for hook in self.hooks:
                hook.on_step_end(state)

        # One iterator per split for the whole run: the datasets are endless, an epoch is `steps` batches.
        train_batches, val_batches = iter(train_data), iter(val_data)
        last = self.epochs
        if state.stopped_early:  # a finished run, resumed: early stopping has decided, more epochs change nothing
            self.log(f"this run stopped early after epoch {state.epoch}: nothing left to train")
            last = state.epoch
        for epoch in range(state.epoch, last):
            skip = state.step
            started = time.perf_counter()
            train = self.trainer.run_epoch(train_batches, True, steps, f"epoch {epoch + 1}/{self.epochs}", self.progress,
                                           skip=skip, on_step=on_step)
            seconds = time.perf_counter() - started
            val = self.trainer.run_epoch(val_batches, False, val_steps, "validation", self.progress)
            trained = max(steps - skip, 1)
            row = {"epoch": epoch + 1, "loss": train["loss"], "accuracy": train["accuracy"],
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "oov": round(train["oov"], 6), "val_oov": round(val["oov"], 6),
                   "seconds": round(seconds, 3), "step_seconds": round(seconds / trained, 4),
                   "examples_per_second": round(examples_per_step * trained / max(seconds, 1e-9), 1),
                   "input_wait_seconds": round(train["input_wait"], 3),
                   # Peak resident memory of this process so far (Linux reports KiB): flat when input streams.
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
            if "at" in first_step and not first_step.get("reported"):
                row["first_step_at"] = round(first_step["at"], 3)  # wall clock: start-up cost, seen from outside
                first_step["reported"] = 1
            if not (math.isfinite(row["loss"]) and math.isfinite(row["val_loss"])):
                raise CaptioningError(f"epoch {epoch + 1}", f"the loss is not finite (loss {row['loss']}, val_loss "
                                      f"{row['val_loss']}); lower --learning-rate, or use --precision float32")
            state.history.append(row)
            state.epoch, state.step = epoch + 1, 0
            self.log(f"epoch {epoch + 1}: loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
                     f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} ({seconds:.1f} s, "
                     f"{row['examples_per_second']:.0f} examples/s, input wait {row['input_wait_seconds']:.1f} s; "
                     f"out of vocabulary: {row['oov']:.1%} of labels, val {row['val_oov']:.1%})")
            for hook in self.hooks:
                hook.on_epoch_end(state, row)
            if state.stop:
                self.log(state.stop)
                break
        for hook in self.hooks:
            hook.on_train_end(state)
        return state
