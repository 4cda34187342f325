"""Submitting jobs: options checked before anything is sent, only the code travels, secrets stay out of what is
printed and recorded; end to end on a real token-auth Ray head and SeaweedFS from the dev cluster script."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from captioning.errors import CaptioningError
from cli.main import main
from ops import submit
from ops.submit import JobRecord, JobRecords, Submission, check_args, redact, source_state, stage_code
from tests.conftest import LoopbackServer, Reply

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-that-must-not-leak"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_job_options_are_checked_before_submission_and_secrets_are_refused(monkeypatch):
    check_args("batch", ["--manifest", "s3://b/m.csv", "--model", "s3://b/model", "--output", "s3://b/out"])
    with pytest.raises(CaptioningError, match="required: --model, --output"):
        check_args("batch", ["--manifest", "m.csv"])
    with pytest.raises(CaptioningError, match="unknown job kind"):
        check_args("evaluate", [])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(CaptioningError, match="holds a secret"):
        check_args("features", ["--manifest", "m.csv", "--out", f"s3://b/{SECRET}"])
    with pytest.raises(CaptioningError, match="holds a user or password in the URL http://\\*\\*\\*@host:9000"):
        check_args("train", ["--train", "a", "--val", "b", "--out", "c", "--s3-endpoint", "http://key:pw@host:9000"])
    assert redact(f"x {SECRET} http://u:pw@h/p") == "x <redacted> http://***@h/p"


@pytest.mark.parametrize("option", ["https://:pw@host/m.csv", "https://TOKEN@host/m.csv", "https://u:p@ss@host/m.csv",
                                    "https://h/m.csv?X-Amz-Signature=abc&X-Amz-Credential=k",
                                    "https://h/m.csv?sig=abc", "https://h/m.csv?token=abc"])
def test_options_that_carry_credentials_are_refused_with_how_to_pass_them(option):
    with pytest.raises(CaptioningError) as caught:
        check_args("batch", ["--manifest", option, "--model", "s3://b/m", "--output", "s3://b/o"])
    message = str(caught.value)
    assert "pass credentials through the environment" in message
    assert "pw" not in message and "abc" not in message and "TOKEN" not in message and "ss@" not in message


def test_short_secrets_are_masked_and_a_name_holding_one_is_refused(monkeypatch, capsys):
    from ops.submit import check_secrets

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "q7z")
    assert redact("key q7z here") == "key <redacted> here"
    with pytest.raises(CaptioningError, match="holds a secret value"):
        check_secrets("jobs submit --name", ["nightly-q7z"])
    code, _, err = run_cli(capsys, "jobs", "submit", "batch", "--name", "nightly-q7z", "--address",
                           "http://127.0.0.1:9", "--", "--manifest", "m", "--model", "m", "--output", "o")
    assert code == 2 and err.count("\n") == 1 and "q7z" not in err


def test_a_record_prefix_that_cannot_be_written_fails_before_submission(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_cli(capsys, "jobs", "submit", "batch", "--record", str(tmp_path / "file" / "records"),
                           "--address", "http://127.0.0.1:9", "--", "--manifest", "m", "--model", "m", "--output", "o")
    # The record is refused first: the cluster (nothing listens at :9) is never asked.
    assert code == 2 and err.count("\n") == 1 and "records" in err and "dashboard" not in err, err


def test_following_a_log_masks_a_secret_split_across_chunks(monkeypatch):
    from ops.submit import LineRedactor

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    printed: list[str] = []
    lines = LineRedactor(printed.append)
    text = f"step 1\nkey {SECRET} used\nurl https://u:pw@h/x?sig=1 done\nlast"
    for start in range(0, len(text), 5):  # every secret is cut by some boundary
        lines.feed(text[start:start + 5])
    lines.close()
    joined = "".join(printed)
    assert SECRET not in joined and "pw" not in joined and "sig=1" not in joined
    assert joined == "step 1\nkey <redacted> used\nurl https://***@h/x?... done\nlast"


def test_submit_without_the_separator_or_cluster_is_one_error_line(capsys, monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli(capsys, "jobs", "submit", "batch", "--address", "http://127.0.0.1:9")
    assert code == 2 and err.count("\n") == 1 and "after `--`" in err
    code, _, err = run_cli(capsys, "jobs", "list")
    assert code == 2 and err.count("\n") == 1 and "--address" in err
    code, _, err = run_cli(capsys, "jobs", "status", "x", "--address", "http://127.0.0.1:9")
    assert code == 2 and "no Ray dashboard answers here" in err and "Traceback" not in err


def git_checkout(root: Path, tracked: dict[str, str]) -> None:
    """A git repository at root whose commit holds exactly these files."""
    for path, text in tracked.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    for argv in (["init", "-q"], ["add", *tracked], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(root), *argv], check=True, capture_output=True)


def test_only_the_tracked_code_travels(tmp_path):
    root = tmp_path / "checkout"
    git_checkout(root, {"captioning/a.py": "A = 1\n", "jobs/b.py": "B = 1\n", "pyproject.toml": "[project]\n",
                        "README.md": "# r\n", "runs/demo/bundle.json": "{}"})
    # Beside the code, untracked: a credentials file, a link into ~/.aws, a data file, caches.
    aws = tmp_path / "home" / ".aws"
    aws.mkdir(parents=True)
    (aws / "credentials").write_text("aws_secret_access_key = x")
    (root / "jobs" / "credentials.env").write_text("AWS_SECRET_ACCESS_KEY=x")
    (root / "captioning" / "aws").symlink_to(aws)
    (root / "captioning" / "big.bin").write_bytes(b"0" * (20 * 2 ** 20))
    (root / "captioning" / "__pycache__").mkdir()
    (root / "captioning" / "__pycache__" / "a.pyc").write_text("x")
    staged = stage_code(tmp_path / "staged", root)
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file() or p.is_symlink())
    assert files == ["README.md", "captioning/a.py", "jobs/b.py", "pyproject.toml"]
    assert source_state(root)["dirty"] == "true"  # untracked files beside the shipped code count as changes
    with pytest.raises(CaptioningError, match="--code image"):
        stage_code(tmp_path / "other", tmp_path / "nowhere")


def test_a_tracked_link_or_too_much_data_is_refused(tmp_path):
    root = tmp_path / "linked"
    git_checkout(root, {"captioning/a.py": "A = 1\n", "pyproject.toml": "[project]\n"})
    (root / "captioning" / "creds").symlink_to(tmp_path)
    subprocess.run(["git", "-C", str(root), "add", "captioning/creds"], check=True, capture_output=True)
    with pytest.raises(CaptioningError, match="is a symbolic link"):
        stage_code(tmp_path / "s1", root)
    heavy = tmp_path / "heavy"
    git_checkout(heavy, {"captioning/a.py": "A = 1\n", "pyproject.toml": "[project]\n",
                         "captioning/data.bin": "0" * (21 * 2 ** 20)})
    with pytest.raises(CaptioningError, match="over 20 MiB"):
        stage_code(tmp_path / "s2", heavy)


def test_metadata_names_the_commit_and_uncommitted_changes(tmp_path):
    repo = tmp_path / "repo"
    (repo / "captioning").mkdir(parents=True)
    (repo / "captioning" / "a.py").write_text("A = 1\n")

    def git(*argv):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    clean = source_state(repo)
    assert len(clean["commit"]) == 40 and clean["dirty"] == "false"
    (repo / "captioning" / "a.py").write_text("A = 2\n")
    assert source_state(repo) == {"commit": clean["commit"], "dirty": "true"}
    assert source_state(tmp_path / "not-git")["commit"] == "unknown"


def test_credentials_travel_only_in_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    job = Submission("batch", ["--manifest", "s3://b/m.csv", "--model", "s3://b/m", "--output", "s3://b/o"])
    env = job.runtime_env(staged=Path("/tmp/code"))
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET and env["working_dir"] == "/tmp/code"
    assert "pip" not in env
    meta = job.metadata("captioning-batch-1")
    assert all(isinstance(v, str) for v in meta.values())
    assert SECRET not in json.dumps(meta) and SECRET not in job.entrypoint()
    assert job.entrypoint().startswith("python -m jobs.batch --manifest s3://b/m.csv")
    assert json.loads(meta["captioning_args"])[1] == "s3://b/m.csv"
    assert job.metadata("captioning-batch-1") is meta  # one submission time, in Ray and in the record
    quiet = Submission("batch", [], forward_credentials=False, pip=True)
    env = quiet.runtime_env(staged=None)
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"] and "working_dir" not in env
    assert "tensorflow==2.21.0" in env["pip"]


def test_records_round_trip_and_stay_inside_their_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    records = JobRecords(str(tmp_path / "records"))
    assert records.all() == []
    record = JobRecord("captioning-batch-2", "batch", "n", ["--x", SECRET], "http://h:8265", "c" * 40, "false",
                       "2026-01-02T00:00:00Z", "me@host")
    records.put(record)
    records.put(JobRecord(**{**record.__dict__, "job_id": "captioning-batch-1", "submitted_at": "2026-01-01T00:00:00Z"}))
    records.update("captioning-batch-2", "FAILED", f"boom {SECRET}")
    got = records.get("captioning-batch-2")
    assert got.state == "FAILED" and got.finished_at and got.message == "boom <redacted>"
    assert [r.job_id for r in records.all()] == ["captioning-batch-1", "captioning-batch-2"]
    assert SECRET not in "".join(p.read_text() for p in (tmp_path / "records").iterdir())
    with pytest.raises(CaptioningError, match="is not a job id"):
        records.get("../../etc/passwd")


# End to end: the dev cluster script, a real Ray head with token auth, SeaweedFS, a submitted batch job.

@pytest.fixture(scope="module")
def dev_cluster(tmp_path_factory):
    """`python -m ops.devcluster up` (what cluster/dev-cluster.sh runs), stopped at the end, also on failure."""
    folder = tmp_path_factory.mktemp("devcluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    out = open(folder.parent / f"{folder.name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ops.devcluster", "up", "--dir", str(folder), "--cpus", "2"],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (folder / "devcluster.pid").exists():
            assert proc.poll() is None, Path(out.name).read_text()[-3000:]
            assert time.monotonic() < deadline, Path(out.name).read_text()[-3000:]
            time.sleep(1)
        exports = dict(line.removeprefix("export ").split("=", 1) for line in (folder / "env.sh").read_text().split("\n")
                       if line)
        yield {"folder": folder, "env": exports, "printed": Path(out.name).read_text(), "process": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        out.close()
    from ops.devcluster import RayHead

    markers = (str(folder), str(RayHead(folder).temp_dir))
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any(m in a for a in p.info["cmdline"] or () for m in markers)]
    assert not leftovers, [p.info["cmdline"][:3] for p in leftovers]


def use_cluster(monkeypatch, cluster) -> None:
    for name in list(os.environ):
        if name.startswith(("AWS_", "RAY_")):
            monkeypatch.delenv(name)
    for name, value in cluster["env"].items():
        monkeypatch.setenv(name, value)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.xdist_group("cluster")
def test_a_batch_job_submitted_to_a_token_auth_cluster_succeeds_without_leaking_secrets(
        dev_cluster, trained_bundle, tmp_path, capsys, monkeypatch):
    from captioning.bulk import read_output
    from captioning.storage import Storage

    use_cluster(monkeypatch, dev_cluster)
    secret, token = dev_cluster["env"]["AWS_SECRET_ACCESS_KEY"], Path(dev_cluster["env"]["RAY_AUTH_TOKEN_PATH"])
    token = token.read_text().strip()
    assert secret not in dev_cluster["printed"] and token not in dev_cluster["printed"]
    assert "RAY_ADDRESS=http://127.0.0.1:" in dev_cluster["printed"]

    server = LoopbackServer()
    try:
        for index in range(5):
            server.routes[f"/img{index}.png"] = Reply(body=png(index), headers={"Content-Type": "image/png"})
        rows = [(f"r{i}", server.url(f"/img{i}.png")) for i in range(5)] + [("bad", server.url("/missing.png"))]
        storage = Storage()
        storage.write_bytes("s3://captioning/in/m.csv",
                            ("id,url\n" + "".join(f"{i},{u}\n" for i, u in rows)).encode())
        for path in trained_bundle.rglob("*"):
            if path.is_file():
                storage.upload_file(path, f"s3://captioning/model/{path.relative_to(trained_bundle).as_posix()}")

        code, out, err = run_cli(
            capsys, "jobs", "submit", "batch", "--wait", "--name", "e2e", "--record", "s3://captioning/records", "--",
            "--manifest", "s3://captioning/in/m.csv", "--model", "s3://captioning/model",
            "--output", "s3://captioning/out", "--id-column", "id", "--allow-network", "127.0.0.1/32",
            "--shard-size", "3", "--no-progress")
        printed = out + err
        assert code == 0, printed[-4000:]
        job_id = next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("submitted "))
        assert f"{job_id} SUCCEEDED" in out and "6 rows: ok 5" in out

        # The outputs, read back from S3: every row once, verbatim, the bad URL as its own status.
        summary = json.loads(storage.read_bytes("s3://captioning/out/_SUCCESS.json"))
        assert summary["rows"] == 6 and summary["statuses"]["ok"] == 5
        output = list(read_output("s3://captioning/out", storage))
        assert sorted(r["id"] for r in output) == sorted(i for i, _ in rows)
        assert {r["id"]: r["url"] for r in output} == dict(rows)
        assert {r["id"]: r["status"] == "ok" for r in output} == {i: i != "bad" for i, _ in rows}

        for argv in (("jobs", "logs", job_id), ("jobs", "list", "--address", dev_cluster["env"]["RAY_ADDRESS"]),
                     ("jobs", "status", job_id)):
            code, out, err = run_cli(capsys, *argv)
            assert code == 0, err
            printed += out + err
        assert "6 rows: ok 5" in printed.split("SUCCEEDED", 1)[1]  # the log, fetched again
        listed = [line for line in printed.splitlines() if line.startswith(job_id)]
        assert any("batch" in line and "SUCCEEDED" in line and "e2e" in line for line in listed), listed

        # The records answer after the cluster is gone: no address needed.
        monkeypatch.delenv("RAY_ADDRESS")
        code, out, err = run_cli(capsys, "jobs", "list", "--record", "s3://captioning/records")
        assert code == 0 and any(job_id in line and "SUCCEEDED" in line for line in out.splitlines()), out + err
        printed += out + err
        record = storage.read_bytes(f"s3://captioning/records/{job_id}.json").decode()

        # The job did get the credentials, as environment only; nothing shown or kept holds a secret.
        info = submit.Cluster(dev_cluster["env"]["RAY_ADDRESS"]).client.get_job_info(job_id)
        assert info.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret
        assert json.loads(record)["state"] == "SUCCEEDED" and json.loads(record)["dirty"] in ("true", "false")
        assert info.metadata["source_commit"] == json.loads(record)["commit"]
        for text in (printed, record, json.dumps(info.metadata), info.entrypoint):
            assert secret not in text and token not in text
    finally:
        server.close()


@pytest.mark.xdist_group("cluster")
def test_a_wrong_or_missing_token_is_one_clear_error(dev_cluster, tmp_path, capsys, monkeypatch):
    use_cluster(monkeypatch, dev_cluster)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, out, err = run_cli(capsys, "jobs", "list")
    assert code == 2 and not out and err.count("\n") == 1
    assert "rejected the Ray auth token" in err and "not-the-token" not in err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = run_cli(capsys, "jobs", "submit", "batch", "--", "--manifest", "s3://captioning/in/m.csv",
                             "--model", "s3://captioning/model", "--output", "s3://captioning/out2")
    assert code == 2 and err.count("\n") == 1 and "requires a Ray auth token and none was found" in err
