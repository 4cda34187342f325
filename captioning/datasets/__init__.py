"""Datasets: each writes images plus a manifest that captioning.manifest reads."""
