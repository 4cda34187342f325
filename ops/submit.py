"""Submitting the Ray jobs to a cluster with Ray's Job Submission SDK, following them, and keeping their records.

A submitted job runs `python -m jobs.<kind> ARGS`, the very entrypoint and options of the local command. The code
travels as a staged copy of the checkout's tracked files (captioning/, jobs/, pyproject.toml, README.md, as
`git ls-files` names them: never an untracked file, a link or data) or is taken from the cluster's image; storage
credentials travel as runtime_env environment variables and are kept out of the entrypoint, metadata, records and
everything printed (captioning/redaction.py). Options and names that carry credentials are refused.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from jobs import options
from jobs.kinds import JOBS
from captioning.atomic import atomic_write
from captioning.errors import CaptioningError
from captioning.records import parse_record
from captioning.redaction import REDACTED, credentials_in, find_token, redact_text, secret_values
from captioning.storage import Storage, is_s3, local_path

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Set on the submitting machine, these reach the job's driver and every task and actor it starts.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
SHIPPED = ("captioning", "jobs", "pyproject.toml", "README.md")  # what a checkout sends: the code, nothing else
MAX_STAGED_BYTES = 20 * 1024 * 1024  # the code is well under 1 MB: anything near this is data that slipped in
ROOT = Path(__file__).resolve().parent.parent
__all__ = ["REDACTED", "find_token", "secret_values"]


def redact(text: str, hidden: list[str] | None = None) -> str:
    """text with every secret value masked and every URL redacted (the project's one redaction)."""
    return redact_text(text, hidden)


def check_args(kind: str, args: list[str]) -> None:
    """The job's options parse as the local command's would, and hold no secret (those go through the env)."""
    if kind not in JOBS:
        raise CaptioningError(kind, f"unknown job kind; choose one of {', '.join(JOBS)}")
    parser = options.job_parser(f"captioning jobs submit {kind} --", "", JOBS[kind].options)

    def refuse(message: str) -> None:
        raise CaptioningError(f"jobs submit {kind}", f"the job's options: {message}")

    parser.error = refuse  # one error line here, before anything reaches the cluster
    parser.parse_args(args)
    check_secrets(f"jobs submit {kind}", args)


def check_secrets(where: str, values: list[str]) -> None:
    """Refuse options (or a job name) that carry a credential: a known secret of any length, a URL's user or
    password, a presigned URL's signature. They would reach Ray's entrypoint, metadata and logs."""
    how = ("pass credentials through the environment (AWS_* are forwarded to the job), and give URLs without "
           "user, password or signature (a presigned URL is a credential)")
    for value in values:
        if any(secret in value for secret in secret_values()):
            raise CaptioningError(where, f"an option holds a secret value (a key or token set here); {how}")
        found = credentials_in(value)
        if found:
            raise CaptioningError(where, f"an option holds {found}; {how}")


def source_state(root: Path = ROOT) -> dict[str, str]:
    """The checkout's commit and whether it has uncommitted changes ("unknown" outside git)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=30,
                                  check=False)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": "unknown"}
    changes = git("status", "--porcelain", "--untracked-files=all", "--", *SHIPPED)
    return {"commit": commit, "dirty": "true" if changes else "false"}


def tracked_files(root: Path = ROOT) -> list[str]:
    """The files of SHIPPED that git tracks (relative paths), as they are in the working tree."""
    try:
        done = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", *SHIPPED], capture_output=True,
                              timeout=60, check=False)
    except OSError:
        done = None
    if done is None or done.returncode != 0:
        raise CaptioningError(str(root), "is not a git checkout: only tracked files are shipped with a job; submit "
                              "from a clone, or with --code image (the cluster's image has the package installed)")
    return sorted(name for name in done.stdout.decode().split("\0") if name)


def stage_code(dest: Path, root: Path = ROOT) -> Path:
    """A copy of exactly the tracked files of SHIPPED to send as the job's working_dir: no untracked file, no link
    followed, nothing over MAX_STAGED_BYTES in all."""
    if not (root / "pyproject.toml").is_file() or not (root / "captioning").is_dir():
        raise CaptioningError(str(root), "is not a checkout of this project; submit with --code image (the cluster's "
                              "image has the package installed)")
    total = 0
    for name in tracked_files(root):
        source = root / name
        if source.is_symlink():
            raise CaptioningError(str(source), "is a symbolic link: a job ships files, never links (they could "
                                  "point anywhere, ~/.aws included)")
        if not source.is_file():
            continue  # tracked but deleted here: the job runs without it, and `dirty` says so
        total += source.stat().st_size
        if total > MAX_STAGED_BYTES:
            raise CaptioningError(str(root), f"the tracked code is over {MAX_STAGED_BYTES // 2 ** 20} MiB (at "
                                  f"{name}): data does not travel with a job; keep it in storage")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, source.read_bytes(), mode=source.stat().st_mode & 0o777)
    return dest


def pinned_dependencies(root: Path = ROOT) -> list[str]:
    """The pinned requirements of pyproject.toml, for a runtime_env pip install."""
    return list(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])


@dataclass
class Submission:
    """One job to submit: what it runs, how its code and settings travel, and where its record goes."""

    kind: str
    args: list[str]
    name: str | None = None
    code: str = "checkout"  # "checkout": ship the staged code as working_dir; "image": the cluster has it installed
    pip: bool = False  # also install the pinned dependencies through runtime_env pip
    forward_credentials: bool = True
    entrypoint_cpus: float | None = None
    _metadata: dict[str, str] = field(default_factory=dict, repr=False)

    def entrypoint(self) -> str:
        """The job's command line: the local command's entrypoint and options."""
        return shlex.join([*JOBS[self.kind].entrypoint, *self.args])

    def environment(self) -> dict[str, str]:
        """Environment variables the job gets: storage settings and credentials when forwarded."""
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        if self.forward_credentials:
            env.update({name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)})
        return env

    def runtime_env(self, staged: Path | None) -> dict[str, Any]:
        """Ray's runtime_env for this job."""
        env: dict[str, Any] = {"env_vars": self.environment()}
        if staged is not None:
            env["working_dir"] = str(staged)
        if self.pip:
            env["pip"] = pinned_dependencies()
        return env

    def metadata(self, job_id: str) -> dict[str, str]:
        """What Ray keeps about the job (all strings, no secrets): kind, options, source, who and when."""
        if self._metadata.get("job_id") != job_id:
            self._metadata = self._describe(job_id)
        return self._metadata

    def _describe(self, job_id: str) -> dict[str, str]:
        return {"job_id": job_id, "captioning_kind": self.kind, "job_name": redact(self.name or job_id),
                "captioning_args": json.dumps([redact(a) for a in self.args]), "code": self.code,
                **{f"source_{k}": v for k, v in source_state().items()},
                "submitted_by": f"{getpass.getuser()}@{socket.gethostname()}",
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass
class JobRecord:
    """What a job submission leaves in --record: enough to list what ran after the cluster is gone."""

    job_id: str
    kind: str
    name: str
    args: list[str]
    address: str
    commit: str
    dirty: str
    submitted_at: str
    submitted_by: str
    state: str = "PENDING"
    message: str = ""
    finished_at: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class JobRecords:
    """Job records under a prefix (folder or s3://), one JSON object per job."""

    def __init__(self, prefix: str, storage: Storage | None = None) -> None:
        self.prefix = prefix.rstrip("/") if is_s3(prefix) else str(local_path(prefix))
        self.storage = storage or Storage()

    def _uri(self, job_id: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", job_id):  # a job id never names a path outside the prefix
            raise CaptioningError(job_id, "is not a job id")
        return f"{self.prefix}/{job_id}.json"

    def put(self, record: JobRecord) -> None:
        """Write (or overwrite) a job's record."""
        text = redact(json.dumps(asdict(record), indent=2))
        self.storage.write_bytes(self._uri(record.job_id), text.encode())

    def get(self, job_id: str) -> JobRecord | None:
        """A job's record, if there is one."""
        uri = self._uri(job_id)
        if not self.storage.exists(uri):
            return None
        return JobRecord(**parse_record(uri, self.storage.read_bytes(uri), "job"))

    def update(self, job_id: str, state: str, message: str = "") -> None:
        """Record a job's latest state (and when it finished)."""
        record = self.get(job_id)
        if record is None or (record.state == state and record.message == message):
            return
        record.state, record.message = state, redact(message)[:2000]
        if state in TERMINAL and not record.finished_at:
            record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.put(record)

    def all(self) -> list[JobRecord]:
        """Every record, oldest submission first."""
        uris = [u for u in self.storage.list(self.prefix) if u.endswith(".json")] \
            if is_s3(self.prefix) or Path(self.prefix).is_dir() else []
        records = [JobRecord(**parse_record(u, self.storage.read_bytes(u), "job")) for u in uris]
        return sorted(records, key=lambda r: (r.submitted_at, r.job_id))

    def probe(self) -> None:
        """Fail now, before a job is submitted, if records cannot be written here."""
        self.storage.check_writable(self.prefix)
        probe = f"{self.prefix}/.probe-{os.getpid()}-{secrets.token_hex(3)}.json"
        self.storage.write_bytes(probe, b"{}")
        self.storage.delete(probe)


class Cluster:
    """A Ray cluster's job API (the dashboard address), with the auth token and one clear error per failure."""

    def __init__(self, address: str | None) -> None:
        address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        if not address:
            raise CaptioningError("--address", "no cluster given: pass --address http://HEAD:8265 (the Ray "
                                  "dashboard) or set RAY_ADDRESS")
        if "://" not in address:
            address = f"http://{address}"
        self.address = address
        token = find_token()
        # Always our own header: without one, Ray's SDK adds whatever token this process cached earlier.
        headers = {"Authorization": f"Bearer {token}" if token else ""}
        self.client = self._call(lambda: _client(address, headers))

    def _call(self, action: Callable[[], Any]) -> Any:
        """Run an SDK call; auth, connection and unknown-job failures become one CaptioningError line."""
        from ray.exceptions import AuthenticationError  # noqa: PLC0415

        where = redact(getattr(self, "address", ""))
        try:
            return action()
        except AuthenticationError as err:
            first = str(err.message if hasattr(err, "message") else err).splitlines()[0]
            if first.startswith("Authentication required"):
                reason = ("the cluster requires a Ray auth token and none was found: set RAY_AUTH_TOKEN, "
                          "RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token")
            else:
                reason = ("the cluster rejected the Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                          "~/.ray/auth_token): it is not this cluster's token")
            raise CaptioningError(where, reason, "auth") from None
        except ValueError as err:  # a malformed address (urllib's "Invalid IPv6 URL", requests' InvalidURL)
            raise CaptioningError(where, f"is not a usable address: {redact(str(err))[:200]}", "bad_address") \
                from None
        except (ConnectionError, OSError) as err:  # requests' ConnectionError is an OSError, not the built-in one
            raise CaptioningError(where, f"no Ray dashboard answers here ({type(err).__name__})",
                                  "unreachable") from None
        except RuntimeError as err:
            text = redact(str(err)).strip().splitlines()
            message = text[-1] if text else type(err).__name__
            if "Jobs API is not supported" in message:
                raise CaptioningError(where, "is not a Ray dashboard: its job API answered 404; give the dashboard's "
                                      "address, http://HEAD:8265", "unreachable") from None
            if "does not exist" in message or "404" in message:
                raise CaptioningError(where, f"no such job: {message[:300]}", "not_found") from None
            raise CaptioningError(where, message[:500]) from None

    def submit(self, submission: Submission, log: Callable[[str], None] = options.result) -> str:
        """Submit a job; returns its id."""
        import tempfile  # noqa: PLC0415

        check_args(submission.kind, submission.args)
        job_id = f"captioning-{submission.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        with tempfile.TemporaryDirectory(prefix="captioning-job-") as tmp:
            staged = stage_code(Path(tmp) / "code") if submission.code == "checkout" else None
            runtime_env = submission.runtime_env(staged)
            metadata = submission.metadata(job_id)
            self._call(lambda: self.client.submit_job(
                entrypoint=submission.entrypoint(), submission_id=job_id, runtime_env=runtime_env,
                metadata=metadata, entrypoint_num_cpus=submission.entrypoint_cpus))
        log(f"submitted {job_id}: {redact(submission.entrypoint())} (commit {metadata['source_commit'][:12]}"
            + (", uncommitted changes" if metadata["source_dirty"] == "true" else "") + f") to {redact(self.address)}")
        return job_id

    def status(self, job_id: str) -> tuple[str, str]:
        """A job's state and Ray's message about it."""
        info = self._call(lambda: self.client.get_job_info(job_id))
        return str(info.status.value if hasattr(info.status, "value") else info.status), headline(info.message)

    def logs(self, job_id: str) -> str:
        """A job's whole log so far, secrets redacted."""
        return redact(self._call(lambda: self.client.get_job_logs(job_id)))

    def follow(self, job_id: str, out: Callable[[str], None]) -> None:
        """Stream a job's log until it ends, secrets redacted."""
        lines = LineRedactor(out)

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                lines.feed(chunk)

        try:
            self._call(lambda: asyncio.run(tail()))
        finally:
            lines.close()

    def wait(self, job_id: str, poll: float = 1.0, timeout: float | None = None) -> tuple[str, str]:
        """Poll until the job ends; returns its final state and message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state, message = self.status(job_id)
            if state in TERMINAL:
                return state, message
            if deadline is not None and time.monotonic() > deadline:
                raise CaptioningError(job_id, f"still {state} after {timeout:g} s")
            time.sleep(poll)

    def stop(self, job_id: str) -> bool:
        """Ask Ray to stop a job; False when it had already ended."""
        return bool(self._call(lambda: self.client.stop_job(job_id)))

    def jobs(self) -> Iterator[dict[str, str]]:
        """Every job the cluster knows, as plain rows (no runtime_env: it holds the forwarded credentials)."""
        for info in self._call(lambda: self.client.list_jobs()):
            meta = info.metadata or {}
            status = info.status.value if hasattr(info.status, "value") else str(info.status)
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.start_time / 1000)) \
                if info.start_time else ""
            yield {"job_id": info.submission_id or info.job_id or "", "kind": meta.get("captioning_kind", "other"),
                   "name": meta.get("job_name", ""), "state": status, "submitted_at": meta.get("submitted_at", started),
                   "commit": meta.get("source_commit", "")[:12]
                   + ("+dirty" if meta.get("source_dirty") == "true" else ""),
                   "message": headline(info.message)}


class LineRedactor:
    """Redacts a log streamed in chunks line by line, so that a secret split across two chunks is still masked."""

    LIMIT = 1 << 20  # a "line" longer than this is cut at its last space: the buffer stays bounded

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out, self.pending = out, ""

    def feed(self, chunk: str) -> None:
        """Take a chunk; write every complete line of what has come so far."""
        self.pending += chunk
        cut = self.pending.rfind("\n") + 1
        if not cut and len(self.pending) > self.LIMIT:
            cut = self.pending.rfind(" ", 0, len(self.pending) - 4096) + 1 or len(self.pending) - 4096
        if cut:
            self.out(redact(self.pending[:cut]))
            self.pending = self.pending[cut:]

    def close(self) -> None:
        """Write what is left (the log's last line, if it had no newline)."""
        if self.pending:
            self.out(redact(self.pending))
            self.pending = ""


def headline(message: str | None) -> str:
    """Ray's job message without the log it appends on failure (the log is `jobs logs`' to show), redacted."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return redact(re.sub(r",? last available logs.*$", "", first))


def _client(address: str, headers: dict[str, str]) -> Any:
    import logging  # noqa: PLC0415

    from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

    # The SDK logs every package upload and websocket close at INFO: our own lines say what happened.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The SDK lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given; ours is already resolved.
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(saved)


def record_for(submission: Submission, job_id: str, address: str) -> JobRecord:
    """The record of a job just submitted."""
    meta = submission.metadata(job_id)
    return JobRecord(job_id=job_id, kind=submission.kind, name=meta["job_name"],
                     args=json.loads(meta["captioning_args"]), address=redact(address),
                     commit=meta["source_commit"], dirty=meta["source_dirty"], submitted_at=meta["submitted_at"],
                     submitted_by=meta["submitted_by"])
