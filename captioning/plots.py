"""Pictures people look at: training curves and word-by-word attention over the image."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO, Sequence

import matplotlib

from captioning.atomic import atomic_path

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """Loss and accuracy per epoch, train and validation, as one PNG."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [row[metric] for row in history], marker="o", label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(f"masked {metric}")
        if metric == "loss" and "val_oov" in history[-1]:  # what the honest loss leaves out, said on the picture
            ax.set_title(f"masked loss ({history[-1]['oov']:.1%} train, {history[-1]['val_oov']:.1%} val labels\n"
                         "out of vocabulary, not scored)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path, dpi=100)
    plt.close(fig)


def plot_attention(image: np.ndarray, words: Sequence[str], maps: np.ndarray, path: str | Path | BinaryIO,
                   title: str = "") -> None:
    """One panel per word: the image with that word's 7x7 attention map stretched over it."""
    if len(words) != len(maps):
        raise ValueError(f"{len(words)} words but {len(maps)} attention maps")
    count = max(len(words), 1)
    cols = min(5, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + (0.4 if title else 0)), squeeze=False)
    height, width = image.shape[:2]
    for ax in axes.ravel():
        ax.axis("off")
    for ax, word, attention in zip(axes.ravel(), words, maps):
        ax.imshow(image)
        # extent stretches the 7x7 grid over the whole picture, one cell per backbone position.
        ax.imshow(attention, cmap="inferno", alpha=0.6, extent=(0, width, height, 0), interpolation="bilinear",
                  vmin=0.0, vmax=float(attention.max()) or 1.0)
        ax.set_title(word, fontsize=12)
    if not words:
        axes[0, 0].imshow(image)
        axes[0, 0].set_title("(empty caption)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path, dpi=80)
    plt.close(fig)


def _save(fig, path: str | Path | BinaryIO, dpi: int) -> None:  # noqa: ANN001  (a matplotlib Figure)
    """A PNG to a file (through the atomic helper: a link at the target is replaced, never written through) or to a
    binary buffer as it is."""
    if isinstance(path, (str, Path)):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    else:
        fig.savefig(path, dpi=dpi, format="png")
