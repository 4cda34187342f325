"""Model registry in object storage (or a folder): numbered versions, a `current` pointer that moves only by
conditional writes, and an append-only history.

    <registry>/versions/v0001/model/...       the model bundle
    <registry>/versions/v0001/version.json    what made it (parent, training manifests with sizes and content tags,
                                              settings, holdout report, decision); written last: it marks the
                                              version complete
    <registry>/claims/v0001.json              created with If-None-Match: two runs never take one number
    <registry>/current.json                   {"version", "previous", "at", "by", "reason"}: created with
                                              If-None-Match, then only replaced with If-Match on the tag read
    <registry>/history/000001.json            one event per object, created with If-None-Match: append-only

S3 conditional writes (If-None-Match / If-Match) are what make this safe with several writers; SeaweedFS and AWS
S3 enforce them (tests/test_registry.py proves it against SeaweedFS). Locally, O_EXCL-style links and a file lock
do the same.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from captioning.errors import CaptioningError
from captioning.lease import process_gone, this_process
from captioning.records import VERSION_PATTERN, parse_record
from captioning.storage import Storage, is_s3, local_path

SCHEME = "registry+"
VERSION = re.compile(VERSION_PATTERN.replace("[0-9]{4,}", "([0-9]{4,})"))
ABANDONED_AFTER = 24 * 3600.0  # a claim this old without its version.json was left by a run that died elsewhere
PINNED = re.compile(r"@(v[0-9]{4,})\Z")  # registry+URI@v0003


def is_registry_ref(model: str) -> bool:
    """Whether a --model names a registry (`registry+s3://b/p`, `registry+/path`, optionally `@v0003`)."""
    return str(model).startswith(SCHEME)


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def who() -> str:
    """user@host, for the history."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class Resolved:
    """A registry reference resolved once: the version and where its bundle is."""

    ref: str  # registry+URI@vNNNN: what output rows record
    version: str
    bundle: str


class Registry:
    """One registry: versions, the current pointer, the history."""

    def __init__(self, uri: str, storage: Storage | None = None) -> None:
        uri = str(uri).removeprefix(SCHEME)
        self.uri = uri.rstrip("/") if is_s3(uri) else str(local_path(uri))
        self.storage = storage or Storage()

    def _at(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    # Versions ---------------------------------------------------------------------------------------------

    def bundle_uri(self, version: str) -> str:
        """Where a version's model bundle lives."""
        return self._at("versions", self._checked(version), "model")

    def _checked(self, version: str) -> str:
        if not isinstance(version, str) or not VERSION.match(version):
            raise CaptioningError(repr(version), "is not a version name (v0001, v0002, ...)")
        return version

    def versions(self) -> list[str]:
        """Complete versions (their version.json is written), oldest first."""
        found = set()
        for key in self.storage.list(self._at("versions")):
            parts = key[len(self.uri):].strip("/").split("/")
            if len(parts) == 3 and parts[2] == "version.json" and VERSION.match(parts[1]):
                found.add(parts[1])
        return sorted(found, key=lambda v: int(v[1:]))

    def info(self, version: str) -> dict[str, Any]:
        """A complete version's version.json."""
        uri = self._at("versions", self._checked(version), "version.json")
        if not self.storage.exists(uri):
            raise CaptioningError(f"{self.uri} {version}", "no such version (or it was never completed)")
        info = parse_record(uri, self.storage.read_bytes(uri), "version")
        if info["version"] != version:
            raise CaptioningError(uri, f"is not a valid registry version record: it names {info['version']}")
        return info

    def abandoned(self, max_age: float = ABANDONED_AFTER) -> list[str]:
        """Claimed versions without a version.json whose claiming process is gone (seen from this host) or that
        were claimed over max_age seconds ago: their run stopped before deciding."""
        complete = set(self.versions())
        found = []
        for key in self.storage.list(self._at("claims")):
            version = key.rsplit("/", 1)[-1].removesuffix(".json")
            if not VERSION.match(version) or version in complete:
                continue
            stamped = self.storage.read_stamped(key)
            if stamped is None:
                continue
            try:
                claimer = json.loads(stamped[0])
            except (ValueError, UnicodeDecodeError):
                claimer = {}
            if stamped[2] > max_age or process_gone(claimer if isinstance(claimer, dict) else {}):
                found.append(version)
        return sorted(found, key=lambda v: int(v[1:]))

    def claim(self) -> str:
        """The next free version number, taken with a conditional create: no other run gets it."""
        claimed = [VERSION.match(k.rsplit("/", 1)[-1].removesuffix(".json")) for k in self.storage.list(self._at("claims"))]
        number = max([int(m.group(1)) for m in claimed if m] + [0]) + 1
        while True:
            version = f"v{number:04d}"
            record = json.dumps({"version": version, "by": who(), "at": now(), **this_process()}).encode()
            if self.storage.create(self._at("claims", f"{version}.json"), record) is not None:
                return version
            number += 1

    def complete(self, version: str, info: dict[str, Any]) -> None:
        """Write version.json (after the bundle): from now on the version is listed."""
        body = {"version": version, "created": now(), "by": who(), **info}
        self.storage.write_bytes(self._at("versions", self._checked(version), "version.json"),
                                 json.dumps(body, indent=2, sort_keys=True).encode())

    def update(self, version: str, **fields: Any) -> None:
        """Add fields to a complete version's version.json (the decision, once made)."""
        info = self.info(version)
        info.update(fields)
        self.storage.write_bytes(self._at("versions", version, "version.json"),
                                 json.dumps(info, indent=2, sort_keys=True).encode())

    # The current pointer ----------------------------------------------------------------------------------

    def current(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current pointer and its tag (None, None when nothing was promoted yet)."""
        uri = self._at("current.json")
        tagged = self.storage.read_tagged(uri)
        if tagged is None:
            return None, None
        return parse_record(uri, tagged[0], "current"), tagged[1]

    def move(self, version: str, expected_tag: str | None, reason: str, action: str,
             verify: Callable[[str], None] | None = None) -> bool:
        """Point current at version if current still has expected_tag (None: nothing promoted yet), after
        verify(bundle_uri) (default: the bundle loads). False, and nothing changed, when someone moved it first."""
        info = self.info(version)  # complete, or this raises
        (verify or (lambda uri: verify_bundle(uri, self.storage)))(self.bundle_uri(version))
        previous, tag = self.current()
        if tag != expected_tag:
            return False  # moved since the caller looked: its `previous` would not be the one replaced
        self._recover_event(previous)
        at = now()
        pointer = json.dumps({"version": version, "previous": previous["version"] if previous else None,
                              "at": at, "by": who(), "reason": reason, "action": action}, indent=2).encode()
        target = self._at("current.json")
        moved = self.storage.create(target, pointer) if expected_tag is None else \
            self.storage.replace_if(target, pointer, expected_tag)
        if moved is None:
            return False
        self.record({"event": action, "version": version, "previous": previous["version"] if previous else None,
                     "reason": reason, "parent": info.get("parent"), "pointer_at": at})
        return True

    def _recover_event(self, pointer: dict[str, Any] | None) -> None:
        """The event of the pointer's own move, if a crash between that move and its event lost it."""
        if pointer is None or "at" not in pointer:
            return
        moves = [e for e in self.history() if e["event"] in ("promote", "rollback")]
        if moves and moves[-1].get("version") == pointer["version"] and moves[-1].get("pointer_at", pointer["at"]) \
                == pointer["at"]:
            return
        self.record({"event": pointer.get("action", "promote"), "version": pointer["version"],
                     "previous": pointer.get("previous"), "reason": pointer.get("reason", ""),
                     "pointer_at": pointer["at"], "recovered": "the run that moved current stopped before its event"})

    def promote(self, version: str, reason: str) -> str:
        """Make version current now (whatever it was), recorded with the reason; returns the previous one."""
        pointer, tag = self.current()
        previous = (pointer or {}).get("version")
        if not self.move(version, tag, reason, "promote"):
            raise CaptioningError(self.uri, "current moved while promoting; look at `models list` and try again")
        return previous

    def rollback(self, reason: str) -> str:
        """Move current back to the current version's parent; returns that parent."""
        pointer, tag = self.current()
        if pointer is None:
            raise CaptioningError(self.uri, "nothing is current yet: nothing to roll back")
        parent = self.info(pointer["version"]).get("parent")
        if not parent:
            raise CaptioningError(f"{self.uri} {pointer['version']}", "has no parent to roll back to")
        if not self.move(parent, tag, reason, "rollback"):
            raise CaptioningError(self.uri, "current moved while rolling back; look at `models list` and try again")
        return parent

    def resolve(self, ref: str) -> Resolved:
        """registry+URI (current) or registry+URI@vNNNN (that version) -> its bundle, resolved once."""
        version = None
        if PINNED.search(ref):
            ref, version = ref.rsplit("@", 1)
        elif "@" in ref.removeprefix(SCHEME).rsplit("/", 1)[-1]:
            raise CaptioningError(ref, "names no version: use registry+URI for the current version or "
                                  "registry+URI@v0003 for one version")
        if not self.exists():
            raise CaptioningError(ref, "no registry here (nothing was ever added to it)")
        if version is None:
            pointer, _ = self.current()
            if pointer is None:
                raise CaptioningError(ref, "the registry has no current version yet (nothing was promoted)")
            version = pointer["version"]
        self.info(version)
        return Resolved(f"{SCHEME}{self.uri}@{version}", version, self.bundle_uri(version))

    # History --------------------------------------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Append one event (who and when added): each is its own object, created only where none was."""
        body = json.dumps({"at": now(), "by": who(), **event}, sort_keys=True).encode()
        taken = [int(k.rsplit("/", 1)[-1].removesuffix(".json")) for k in self.storage.list(self._at("history"))
                 if k.rsplit("/", 1)[-1].removesuffix(".json").isdigit()]
        number = max(taken + [0]) + 1
        while self.storage.create(self._at("history", f"{number:06d}.json"), body) is None:
            number += 1

    def history(self) -> list[dict[str, Any]]:
        """Every event, oldest first."""
        keys = sorted(k for k in self.storage.list(self._at("history")) if k.endswith(".json"))
        return [parse_record(k, self.storage.read_bytes(k), "event") for k in keys]

    def exists(self) -> bool:
        """Whether anything was ever stored here (a version claimed)."""
        return bool(self.storage.list(self._at("claims")))


def verify_bundle(uri: str, storage: Storage | None = None) -> None:
    """A bundle is only pointed at once it loads (TensorFlow: imported here, not by the registry's readers)."""
    from captioning.bundle import load_bundle  # noqa: PLC0415

    load_bundle(uri, storage=storage)


def resolve_model(model: str, storage: Storage | None = None) -> Resolved:
    """--model as given: a registry reference resolved to its version, or a bundle path/URI as it is."""
    if not is_registry_ref(model):
        return Resolved(model, "", model)
    uri = model.removeprefix(SCHEME)
    base = uri.rsplit("@", 1)[0] if PINNED.search(uri) else uri
    return Registry(base, storage).resolve(model)


EXTRAS = ("history.csv", "history.json", "training_curves.png")  # kept beside a bundle when the source has them


def bundle_files(source: str, storage: Storage) -> dict[str, str]:
    """A bundle's own files (folder or s3:// prefix), bundle.json last; never checkpoints or feature caches."""
    from captioning.bundle import BACKBONE, DECODER, MANIFEST, VOCABULARY  # noqa: PLC0415

    present: dict[str, str] = {}
    for name in (VOCABULARY, DECODER, BACKBONE, *EXTRAS, MANIFEST):  # bundle.json last: it marks completeness
        uri = f"{source.rstrip('/')}/{name}" if is_s3(source) else str(local_path(source) / name)
        if storage.exists(uri):
            present[name] = uri
        elif name not in EXTRAS:
            raise CaptioningError(source, f"is not a model bundle ({name} is missing)")
    return present


def store_bundle(registry: Registry, version: str, source: str) -> None:
    """Copy a bundle's files into a claimed version."""
    storage = registry.storage
    target = registry.bundle_uri(version)
    for name, uri in bundle_files(source, storage).items():
        storage.upload_file(storage.local_file(uri) if is_s3(uri) else uri, f"{target}/{name}")


def add_bundle(registry: Registry, source: str, info: dict[str, Any],
               verify: Callable[[str], None] | None = None) -> str:
    """Copy a bundle into a newly claimed version, completed with the current version as its parent; returns
    the version. verify(source) runs first (default: the bundle loads)."""
    bundle_files(source, registry.storage)  # not a bundle: refused before a number is taken
    (verify or (lambda uri: verify_bundle(uri, registry.storage)))(source)  # nor one that does not load
    version = registry.claim()
    store_bundle(registry, version, source)
    pointer, _ = registry.current()
    registry.complete(version, {"parent": (pointer or {}).get("version"), **info})
    return version
