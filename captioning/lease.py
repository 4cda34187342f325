"""A lease on an output: one run writes it at a time. Conditional writes, local or S3; no TensorFlow, no Ray.

Staleness is judged by the lease object's own storage time (S3 LastModified against the answer's Date, a file's
mtime), never by the clock of the host that wrote it; a holder's pid is only looked at when the lease was written
on this very host, boot and pid namespace. A run that loses its lease stops: the heartbeat thread signals the main
thread (SIGUSR1, handled only while the lease is held; SIGINT may be ignored, as in any job started with `&`),
whose handler raises LeaseLost wherever the run is, and the run ends with that one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable

import psutil

from captioning.errors import CaptioningError
from captioning.storage import Storage, StorageError


_HELD: set[str] = set()  # ids of the leases this process holds now
LOST_SIGNAL = signal.SIGUSR1
LEASE = "_lease.json"  # the lease object's name inside the folder (output, --out, registry) it guards
STALE_AFTER = 120.0  # seconds without a heartbeat before another run may take a lease


def lease_uri(folder: str) -> str:
    """Where the lease of an output folder, training --out or registry lives."""
    return f"{folder.rstrip('/')}/{LEASE}"


def leased(storage: Storage, folder: str, what: str, log: Callable[[str], None] = print,
           stale_after: float = STALE_AFTER) -> "Lease":
    """The lease of one folder, to hold with `with`: one run writes it at a time."""
    return Lease(storage, lease_uri(folder), stale_after=stale_after, log=log, what=what)


class LeaseHeld(CaptioningError):
    """Another live run holds the lease."""


class LeaseLost(CaptioningError):
    """Another run took this run's lease over: this run stopped writing."""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    """Who this process is, as a lease or a decision records it: host, boot, pid namespace, pid and its start."""
    return {"host": socket.gethostname(), "boot": psutil.boot_time(), "pid_ns": _pid_namespace(),
            "pid": os.getpid(), "pid_started": psutil.Process().create_time()}


def process_gone(holder: dict[str, Any]) -> bool:
    """True only when the recorded process ran on this host, boot and pid namespace, and no longer runs (a
    container with the same hostname, or a host rebooted since, is not "here": only time can tell)."""
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot") != psutil.boot_time() or holder.get("pid_ns") != _pid_namespace():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    try:
        return psutil.Process(pid).create_time() != holder.get("pid_started")
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


class Lease:
    """A small object written with a conditional create and renewed by a heartbeat thread.

    A lease whose heartbeat is older than stale_after seconds belongs to a run that died: it is taken over
    (with a conditional replace, so two runs cannot both take it).
    """

    def __init__(self, storage: Storage, uri: str, stale_after: float = STALE_AFTER, heartbeat: float = 15.0,
                 log: Callable[[str], None] = print, what: str = "run") -> None:
        self.storage, self.uri, self.stale_after, self.heartbeat, self.log = storage, uri, stale_after, heartbeat, log
        self.what = what
        self.id = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._interrupted = False
        self._armed = False  # our LOST_SIGNAL handler is installed (a `with` in the main thread)
        self._previous_handler: object = None
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        """What the lease says about its holder: enough to find it, nothing secret."""
        return json.dumps({"id": self.id, **this_process(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                           "heartbeat": time.time(), "what": self.what}).encode()

    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeld naming the live holder."""
        _HELD.add(self.id)  # before it can be seen: a thread of this process must not think it a leftover
        try:
            return self._acquire()
        except BaseException:
            _HELD.discard(self.id)
            raise

    def _acquire(self) -> "Lease":
        for _ in range(3):  # the holder may release between our create and our read
            self._tag = self.storage.create(self.uri, self.record())
            if self._tag:
                break
            current = self.storage.read_stamped(self.uri)
            if current is None:
                continue
            data, tag, age = current
            holder = _parse(data, self.uri, self.log)
            if holder and age < self.stale_after and not _gone(holder):
                raise LeaseHeld(self.uri, f"another {holder.get('what', 'run')} is writing this output: host "
                                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                                f"{holder.get('started', '?')} (heartbeat {age:.0f} s ago); wait for it to finish, "
                                f"or use another output")
            self._tag = self.storage.replace_if(self.uri, self.record(), tag)
            if not self._tag:
                continue  # someone else took it over first: look again
            why = ("it is unreadable" if not holder else "its process is gone" if _gone(holder)
                   else f"last heartbeat {age:.0f} s ago")
            self.log(f"took over a stale lease on {self.uri} from host {holder.get('host', '?')} pid "
                     f"{holder.get('pid', '?')} ({why})")
            break
        if not self._tag:
            raise LeaseHeld(self.uri, "could not take the lease: it keeps changing hands")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """One heartbeat; False (and lost) when another run has taken the lease over meanwhile."""
        try:
            tag = self.storage.replace_if(self.uri, self.record(), self._tag)
        except StorageError as err:  # a storage blip: the next beat tries again
            self.log(f"warning: lease heartbeat failed: {err}")
            return True
        if tag is None:
            self.lost = True
            self.log(f"warning: lost the lease on {self.uri}: another run took it over; this run stops writing")
            if self._armed and not self._stop.is_set():
                self._interrupted = True
                # To the main thread itself, so that a sleep or a blocking call there returns at once.
                signal.pthread_kill(threading.main_thread().ident, LOST_SIGNAL)
            return False
        self._tag = tag
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat) and self.renew():
            pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        _HELD.discard(self.id)
        if self._thread is not None:
            self._thread.join()
        if self.lost or not self._tag:
            return
        storage = self.storage.patient(5.0)  # on the way out of a failed run: do not wait out a long outage
        try:
            current = storage.read_tagged(self.uri)
            if current is not None and current[1] == self._tag:
                storage.delete(self.uri)
        except StorageError as err:
            self.log(f"warning: could not release the lease on {self.uri} ({err.message}); it goes stale "
                     f"{self.stale_after:.0f} s after its last heartbeat, or at once for a rerun on this host")

    def check(self) -> None:
        """Raise LeaseLost if another run has taken the lease over: call before each commit."""
        if self.lost:
            raise self._lost_error()

    def _lost_error(self) -> LeaseLost:
        return LeaseLost(self.uri, "another run took over this output's lease while this run worked; this run "
                         "stopped writing (its committed work stays; rerun it once the other run ends)")

    def _on_lost(self, signum: int, frame: object) -> None:
        raise self._lost_error()

    def __enter__(self) -> "Lease":
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(LOST_SIGNAL, self._on_lost)
            self._armed = True
        try:
            return self.acquire()
        except BaseException:
            self._disarm()
            raise

    def _disarm(self) -> None:
        if self._armed:
            signal.signal(LOST_SIGNAL, self._previous_handler or signal.SIG_DFL)
            self._armed = False

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        try:
            self.release()  # joins the heartbeat: no signal is sent after this
        finally:
            self._disarm()
        if self.lost and (kind is None or self._interrupted or isinstance(err, LeaseLost)):
            raise self._lost_error() from None


def live_holder(storage: Storage, uri: str, stale_after: float = STALE_AFTER) -> dict | None:
    """Who holds the lease at uri while its heartbeat is fresh and its process alive, else None: how a scheduler
    tells that a run is still writing an output, wherever that run was started."""
    current = storage.read_stamped(uri)
    if current is None:
        return None
    holder = _parse(current[0], uri, None)
    age = current[2]
    return {**holder, "age": age} if holder and age < stale_after and not _gone(holder) else None


def _gone(holder: dict) -> bool:
    """True when the holder's process is known to be gone: on this host, boot and pid namespace (killed, not
    stopped), or an earlier run of this very process that could not remove its lease (storage was down)."""
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid() \
            and holder.get("pid_started") == psutil.Process().create_time() and holder.get("id") not in _HELD:
        return True
    return process_gone(holder)


def _parse(data: bytes, uri: str, log: Callable[[str], None] | None) -> dict:
    """A lease's holder record; {} (stale, logged) when it is not a JSON object."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        value = None
    if isinstance(value, dict) and value:
        return value
    if log is not None:
        log(f"warning: the lease {uri} is unreadable (not a lease record): treated as stale")
    return {}
