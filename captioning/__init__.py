"""Attention image captioner: library for training, generation and evaluation."""

__version__ = "0.1.0"
