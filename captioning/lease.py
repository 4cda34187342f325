"""A lease on an output: one run writes it at a time. Conditional writes, local or S3; no TensorFlow, no Ray."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

import psutil

from captioning.errors import CaptioningError
from captioning.storage import Storage, StorageError


_HELD: set[str] = set()  # ids of the leases this process holds now


class LeaseHeld(CaptioningError):
    """Another live run holds the lease."""


class Lease:
    """A small object written with a conditional create and renewed by a heartbeat thread.

    A lease whose heartbeat is older than stale_after seconds belongs to a run that died: it is taken over
    (with a conditional replace, so two runs cannot both take it).
    """

    def __init__(self, storage: Storage, uri: str, stale_after: float = 120.0, heartbeat: float = 15.0,
                 log: Callable[[str], None] = print, what: str = "run") -> None:
        self.storage, self.uri, self.stale_after, self.heartbeat, self.log = storage, uri, stale_after, heartbeat, log
        self.what = what
        self.id = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        """What the lease says about its holder: enough to find it, nothing secret."""
        return json.dumps({"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_started": psutil.Process().create_time(),
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
            current = self.storage.read_tagged(self.uri)
            if current is None:
                continue
            data, tag = current
            holder = _parse(data)
            age = time.time() - float(holder.get("heartbeat", 0.0))
            if age < self.stale_after and not _gone(holder):
                raise LeaseHeld(self.uri, f"another {holder.get('what', 'run')} is writing this output: host "
                                f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                                f"{holder.get('started', '?')} (heartbeat {age:.0f} s ago); wait for it to finish, "
                                f"or use another output")
            self._tag = self.storage.replace_if(self.uri, self.record(), tag)
            if not self._tag:
                continue  # someone else took it over first: look again
            why = "its process is gone" if _gone(holder) else f"last heartbeat {age:.0f} s ago"
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
            self.log(f"warning: lost the lease on {self.uri}: another run took it over")
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

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holder(storage: Storage, uri: str, stale_after: float = 120.0) -> dict | None:
    """Who holds the lease at uri while its heartbeat is fresh and its process alive, else None: how a scheduler
    tells that a run is still writing an output, wherever that run was started."""
    current = storage.read_tagged(uri)
    if current is None:
        return None
    holder = _parse(current[0])
    age = time.time() - float(holder.get("heartbeat", 0.0))
    return {**holder, "age": age} if age < stale_after and not _gone(holder) else None


def _gone(holder: dict) -> bool:
    """True when the holder ran on this host and its process no longer exists (killed, not stopped)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False  # another machine: only the heartbeat can tell
    if holder["pid"] == os.getpid() and holder.get("id") not in _HELD:
        return True  # an earlier run in this very process, which could not remove its lease (storage was down)
    try:
        return psutil.Process(holder["pid"]).create_time() != holder.get("pid_started")
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable: treated as a lease with no heartbeat, i.e. stale
    return value if isinstance(value, dict) else {}
