"""Error types that carry the input they are about, so every failure prints as one clear line."""

from __future__ import annotations


class CaptioningError(Exception):
    """A user-facing failure about one named input (file, URL, row, model directory)."""

    def __init__(self, source: str, message: str, reason: str = "error") -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message
        self.reason = reason


class ManifestError(CaptioningError):
    """A manifest file, or one of its rows, cannot be read."""


class ImageError(CaptioningError):
    """Bytes that are not a usable image (reason: not_an_image, truncated, too_large, unreadable)."""


class FetchError(CaptioningError):
    """A URL that could not be fetched (reason: http_404, timeout, blocked_address, ...)."""


class BundleError(CaptioningError):
    """A model directory that is missing, incomplete or corrupt."""
