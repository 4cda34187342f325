"""Error types that carry the input they are about, so every failure prints as one clear line."""

from __future__ import annotations

import logging

from captioning.redaction import redact, redact_text

__all__ = ["BundleError", "CaptioningError", "FetchError", "ImageError", "ManifestError", "captioning_cause",
           "internal_error", "redact"]
_logged_internal: set[str] = set()


class CaptioningError(Exception):
    """A user-facing failure about one named input (file, URL, row, model directory)."""

    def __init__(self, source: str, message: str, reason: str = "error") -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message
        self.reason = reason

    def __reduce__(self):  # noqa: ANN204  (Ray ships errors between processes by pickling them)
        return type(self), (self.source, self.message, self.reason)


def captioning_cause(err: BaseException) -> CaptioningError | None:
    """The CaptioningError behind err: itself, or one Ray wrapped (a task's error reaches the driver inside
    RayTaskError or Ray Data's UserCodeException)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CaptioningError) and type(current).__module__.startswith("captioning"):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


class ManifestError(CaptioningError):
    """A manifest file, or one of its rows, cannot be read."""


class ImageError(CaptioningError):
    """Bytes that are not a usable image (reason: not_an_image, truncated, too_large, unreadable)."""


class FetchError(CaptioningError):
    """A URL that could not be fetched (reason: http_404, timeout, blocked_address, ...)."""


class BundleError(CaptioningError):
    """A model directory that is missing, incomplete or corrupt."""


def internal_error(err: Exception, source: str) -> str:
    """An unexpected exception while handling one row, as that row's error text.

    Its first occurrence per exception type is logged with a traceback; the rest live in their rows.
    """
    kind = type(err).__name__
    text = redact_text(" ".join(str(err).split()))
    if kind not in _logged_internal:
        _logged_internal.add(kind)
        logging.getLogger("captioning").error("internal error on %s (later %s errors are recorded in their rows "
                                              "only)", redact(source), kind, exc_info=err)
    return f"{kind}: {text}"[:500]
