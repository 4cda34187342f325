"""What a command shows besides its output: log lines with a level (timestamped when stderr is a file), progress
(bars on a terminal, plain lines with rate and ETA elsewhere), and a quiet TensorFlow start-up.

TensorFlow's C++ runtime prints 5-7 lines when it loads (oneDNN, cudart, and on a machine without a GPU an
`E0000 ... failed call to cuInit` that reads like a failure); those before absl initialises ignore
TF_CPP_MIN_LOG_LEVEL. So the first `import tensorflow` of a process runs with stderr pointed at a temporary file,
shown only if the import fails, and the command logs one `devices:` line instead. `--verbose` or
CAPTIONING_VERBOSE=1 shows everything. Nothing here imports TensorFlow or Ray at module level.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator

from captioning.redaction import printable, redact_text

LOGGER = "captioning"
VERBOSE_ENV = "CAPTIONING_VERBOSE"
LEVEL_ENV = "CAPTIONING_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger(LOGGER)


def verbose() -> bool:
    """Whether start-up logs of TensorFlow and Ray are wanted (--verbose, or CAPTIONING_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def setup(level: str | None = None, verbose_flag: bool = False) -> None:
    """Logging for a command or job: level from the option, else CAPTIONING_LOG_LEVEL, else info; timestamps and
    levels when stderr is not a terminal (a job log, CI, `2> file`). The quiet TensorFlow import is armed."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers started from here inherit it
    level = (level or os.environ.get(LEVEL_ENV) or ("debug" if verbose() else "info")).lower()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    handler = _CurrentStderr()
    handler.addFilter(_redacted)
    handler.setFormatter(_TerminalFormatter() if sys.stderr.isatty() else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    quiet_tensorflow()


def _redacted(record: logging.LogRecord) -> bool:
    """Every line logged leaves with its secrets masked, URLs redacted and control characters escaped."""
    record.msg, record.args = printable(redact_text(record.getMessage())), None
    return True


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners and tools swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _TerminalFormatter(logging.Formatter):
    """On a terminal: the message alone, `warning: ` before warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


# Quiet TensorFlow ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _stderr_captured() -> Iterator[Any]:
    """Point file descriptor 2 at a temporary file (C++ writes there directly, past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with stderr captured, then finds the devices (cuInit) the same way."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # Its C++ runtime's later lines too: even its ERROR lines are notices (oneDNN falling back to Eigen for
        # float16); real failures reach Python as exceptions.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # whatever a parent set: --verbose is the way to see them
        with _stderr_captured() as captured:
            try:
                self.loader.exec_module(module)
                module.config.list_physical_devices()  # CUDA initialises here: its errors are start-up noise too
            except BaseException:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))  # a failed import shows why
                raise
        module.get_logger().setLevel("ERROR")
        log.info(describe_devices(module))


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Catches the first `import tensorflow` of this process, wherever it happens."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; TensorFlow's own submodules import normally
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow() -> None:
    """Arm the quiet import (unless verbose, or TensorFlow is already loaded); idempotent."""
    if verbose() or "tensorflow" in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())


def quiet_worker() -> None:
    """Ray's worker_process_setup_hook: workers start as quietly as the command that launched them, and say
    nothing below a warning unless asked (the driver already named the devices; each worker would repeat it)."""
    setup(os.environ.get(LEVEL_ENV) or ("debug" if verbose() else "warning"))


def describe_devices(tf: Any = None) -> str:
    """`devices: ...`: what TensorFlow will compute on."""
    if tf is None:
        import tensorflow as tf  # noqa: PLC0415
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "devices: CPU (no GPU visible)"
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return f"devices: {len(gpus)} GPU ({', '.join(names)}) and the CPU"


# Progress -----------------------------------------------------------------------------------------------------

class LineProgress:
    """Progress as plain log lines for files: at most one each `every` seconds, or when another tenth is done,
    with rate and ETA; never a carriage return."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = 10.0, min_gap: float = 2.0,
                 initial: int = 0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every, self.min_gap = every, min_gap
        self.done, self.initial, self.postfix = initial, initial, ""
        self.started = self.last_time = time.monotonic()
        self.last_tenth = int(10 * initial / total) if total else 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        """n more units done."""
        self.done += n
        now = time.monotonic()
        tenth = int(10 * self.done / self.total) if self.total else 0
        if now - self.last_time >= self.every or (tenth > self.last_tenth and now - self.last_time >= self.min_gap):
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        """Figures appended to the next line (loss, rows/s, ...)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({self.done / self.total:.0%})"
        parts.append(f"{rate:.2f} {self.unit}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        log.info(", ".join(parts))
        self.last_time = now
        self.last_tenth = int(10 * self.done / self.total) if self.total else 0

    def close(self) -> None:
        """A last line, unless the last one already said it all."""
        if not self.closed and self.done > self.initial and (not self.total or self.last_tenth < 10):
            self._line(time.monotonic())
        self.closed = True

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("wrap an iterable with progress(iterable=...)")


class _Iterating:
    def __init__(self, iterable: Iterable[Any], bar: LineProgress) -> None:
        self.iterable, self.bar = iterable, bar

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.bar.update(1)
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
             iterable: Iterable[Any] | None = None, leave: bool = True, initial: int = 0) -> Any:
    """A tqdm bar on a terminal, LineProgress lines anywhere else, nothing when not enabled. With iterable,
    an iterable that advances the progress."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=sys.stderr)
    if iterable is not None and total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = LineProgress(total, desc, unit, initial=initial) if enabled else _Silent()
    return _Iterating(iterable, bar) if iterable is not None else bar


class _Silent(LineProgress):
    def __init__(self) -> None:
        super().__init__(None, "", "")

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        self.closed = True
