"""--output-format webdataset: tar shards that the webdataset package and Ray Data read, exactly once."""

import io
import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.bulk import BulkConfig, read_output
from captioning.images import image_extension
from captioning.manifest import ManifestSpec
from captioning.webdataset import FOLDER, sample_key
from tests.conftest import PATIENT_LOOPBACK, LoopbackServer, Reply
from tests.test_dedupe import jpeg

pytestmark = pytest.mark.ray


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (i, 100, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def tars(output: Path) -> list[Path]:
    return sorted((output / FOLDER).glob("shard-*.tar"))


def members(output: Path) -> list[str]:
    names = []
    for path in tars(output):
        with tarfile.open(path) as tar:
            names += tar.getnames()
    return names


@pytest.fixture
def served():
    """12 distinct JPEGs, a PNG, a 404 and a URL that answers 503 until told otherwise."""
    server = LoopbackServer()
    state = {"flaky": True}
    for i in range(12):
        server.routes[f"/{i}.jpg"] = Reply(200, jpeg(100 + i))
    server.routes["/p.png"] = Reply(200, png(1))
    server.routes["/flaky.jpg"] = lambda _: Reply(503) if state["flaky"] else Reply(200, jpeg(99))
    urls = [server.url(f"/{i}.jpg") for i in range(12)] + [server.url("/p.png"), server.url("/gone.jpg"),
                                                           server.url("/flaky.jpg"), server.url("/0.jpg")]
    yield server, urls, state
    server.close()


def test_webdataset_output_is_read_by_webdataset_and_ray_data_and_retries_keep_their_files(
        served, ray_session, trained_bundle, tmp_path):
    import ray
    import webdataset as wds
    from jobs.batch import run

    server, urls, state = served
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "url": u}) + "\n" for i, u in enumerate(urls)))
    out = tmp_path / "out"
    config = BulkConfig(str(tmp_path / "m.jsonl"), str(trained_bundle), str(out),
                        ManifestSpec(image_column="url", id_column="id"), shard_size=5, batch_size=4, fetch=PATIENT_LOOPBACK,
                        output_format="webdataset", keep_original=True)
    summary = run(config, log=lambda _: None, progress=False)
    assert summary["statuses"] == {"ok": 13, "http_404": 1, "http_503": 1, "duplicate": 1}
    assert len(tars(out)) == 4 and not (out / "captions").exists()

    # The webdataset package, as a user would open the shards.
    samples = list(wds.WebDataset([str(p) for p in tars(out)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(row) for row in range(1, 17)]
    for sample in samples:
        row = json.loads(sample["json"])
        assert sample["__key__"] == sample_key(row["row"]) and row["url"] == urls[row["row"] - 1]
        if row["status"] == "ok":
            image = sample.get("jpg", sample.get("png"))
            assert image == server.routes[row["url"].split(str(server.port), 1)[1]].body  # bytes as fetched
            assert sample["txt"].decode() == row["caption"] and row["caption"]
            maps = np.load(io.BytesIO(sample["attention.npy"]), allow_pickle=False)
            assert maps.shape == (row["attention_length"], 7, 7) == (len(row["caption"].split()), 7, 7)
        else:  # failed and duplicate rows: the JSON row only
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"json"}
    assert "png" in samples[12] and image_extension(samples[12]["png"]) == "png"

    # Ray Data's own reader, raw (its default decoder cannot mix arrays with the failed rows' missing members):
    # one row per sample, the same members.
    read = sorted(ray.data.read_webdataset(str(out / FOLDER), decoder=None).take_all(), key=lambda r: r["__key__"])
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    assert [r["json"] for r in read] == [s["json"] for s in samples]
    assert [r.get("attention.npy") for r in read if isinstance(r.get("attention.npy"), bytes)] == \
        [s["attention.npy"] for s in samples if "attention.npy" in s]

    # The same reader the project has for Parquet outputs reads the tars' rows.
    rows = sorted(read_output(str(out)), key=lambda r: r["row"])
    assert [r["url"] for r in rows] == urls and rows[15]["duplicate_of"] == 1

    # --retry-failed: the 503 row is redone; the kept rows' files are copied as they were.
    flaky_tar = tars(out)[2]
    before = {name: body for name, body in _files(flaky_tar).items() if not name.startswith(sample_key(15))}
    state["flaky"] = False
    again = run(replace(config, retry_failed=True), log=lambda _: None, progress=False)
    assert again["statuses"] == {"ok": 14, "http_404": 1, "duplicate": 1}
    after = _files(flaky_tar)
    assert {name: after[name] for name in before} == before
    assert {f"{sample_key(15)}.{ext}" for ext in ("jpg", "txt", "json", "attention.npy")} <= set(after)
    assert sorted(members(out)) == sorted(set(members(out)))  # every member once


def _files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_killed_webdataset_job_rerun_leaves_each_key_exactly_once(trained_bundle, synthetic_data, tmp_path):
    from tests.test_batch_kill import kill_job, start_and_wait_for_commits

    server = LoopbackServer()
    try:
        rows = 24
        for i in range(rows):
            server.routes[f"/{i}.jpg"] = Reply(200, jpeg(i), delay=0.3)
        (tmp_path / "m.csv").write_text("id,url\n" + "".join(f"r{i},{server.url(f'/{i}.jpg')}\n" for i in range(rows)))
        out = tmp_path / "out"
        command = [sys.executable, "-m", "cli", "batch", "--manifest", str(tmp_path / "m.csv"), "--model",
                   str(trained_bundle), "--output", str(out), "--id-column", "id", "--shard-size", "4",
                   "--batch-size", "4", "--fetch-threads", "2", "--allow-network", "127.0.0.1/32", "--no-progress",
                   "--output-format", "webdataset"]
        job = start_and_wait_for_commits(command, out, 2)
        kill_job(job)
        assert not (out / "_SUCCESS.json").exists()
        second = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    finally:
        server.close()
    names = members(out)
    assert len(names) == len(set(names))  # no member twice, in any tar
    keys = sorted({name.split(".", 1)[0] for name in names})
    assert keys == [sample_key(row) for row in range(2, rows + 2)]  # CSV rows are numbered from the header's 1
    assert all(f"{key}.{ext}" in names for key in keys for ext in ("jpg", "txt", "json", "attention.npy"))
    jpg = next(name for name in names if name.endswith(".jpg"))
    with tarfile.open(tars(out)[0]) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(jpg).read()))
    assert image.size == (224, 224)  # the model's view, not the 48x48 original
