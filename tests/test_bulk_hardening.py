"""Hostile manifests and changed reruns: the bulk job survives every row and stays exactly once."""

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import errors
from captioning.shards import fetching
from captioning.bulk import BulkConfig, CaptionShard, CaptionWriter, attention_for, read_output
from captioning.shards.fetching import admit, fetch_shard
from captioning.shards.layout import file_id, uri
from captioning.shards.payloads import ShardInput
from captioning.shards.plan import plan_shards
from captioning.config import FetchConfig
from captioning.errors import CaptioningError
from captioning.lease import Lease, LeaseHeld
from captioning.manifest import ManifestSpec
from captioning.storage import Storage
from tests.conftest import LoopbackServer, Reply, tagged_jpeg

LOOPBACK = FetchConfig(allowed_networks=("127.0.0.1/32",), retries=0, backoff=0.01, read_timeout=1.0, deadline=2.0)
SECRET = "hunter2"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(synthetic_data):
    return sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))


def hostile_rows(server: LoopbackServer, images: list[Path], tmp_path: Path) -> list[tuple[str, str]]:
    """(url cell as written, expected status) for every bad case, between good loopback URLs."""
    port = server.port
    for i, path in enumerate(images[:4]):
        server.routes[f"/ok{i}.jpg"] = Reply(200, path.read_bytes(), {"Content-Type": "image/jpeg"})
    server.routes["/bad-redirect.jpg"] = Reply(302, headers={"Location": "http://[::1/x"})
    server.routes["/drip.jpg"] = Reply(200, b"x" * 200, drip=0.1)
    # 8000x7999 RGBA compresses to a small PNG but would take ~0.5 GB to decode.
    server.routes["/huge.png"] = Reply(200, png(Image.new("RGBA", (8000, 7999))))
    (tmp_path / "secret.jpg").write_bytes(images[0].read_bytes())  # a readable local image: must not be read
    return [
        (server.url("/ok0.jpg"), "ok"),
        ("http://[::1/x", "bad_url"),
        (server.url("/bad-redirect.jpg"), "bad_url"),
        ("http://a..example/x.jpg", "bad_url"),
        (f"http://{'a' * 64}.example/x.jpg", "bad_url"),
        (server.url("/ok1.jpg"), "ok"),
        (server.url("/drip.jpg"), "timeout"),
        (str(tmp_path / "secret.jpg"), "bad_url"),
        ("../secret.jpg", "bad_url"),
        (f"file://{tmp_path / 'secret.jpg'}", "unsupported_scheme"),
        ("s3://other-bucket/key.jpg", "unsupported_scheme"),
        ("ftp://example.com/x.jpg", "unsupported_scheme"),
        ("not a url", "bad_url"),
        (f"http://user:{SECRET}@127.0.0.1:{port}/missing.jpg?token={SECRET}", "http_404"),
        (f"http://127.0.0.2:{port}/private.jpg", "blocked_address"),
        (server.url("/huge.png"), "too_large"),
        (f" {server.url('/ok2.jpg')} ", "ok"),  # padded: fetched trimmed, reported as written
        (server.url("/ok3.jpg"), "ok"),
    ]


@pytest.mark.ray
def test_hostile_manifest_every_row_once_verbatim(ray_session, trained_bundle, images, tmp_path, capsys):
    from cli.main import main

    server = LoopbackServer()
    try:
        rows = hostile_rows(server, images, tmp_path)
        lines = [json.dumps({"id": f"r{i}", "url": value}) for i, (value, _) in enumerate(rows)]
        lines.insert(3, json.dumps({"id": "r-missing", "caption": "no url at all"}))  # a malformed row
        (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
        out = tmp_path / "out"
        code = main(["batch", "--manifest", str(tmp_path / "m.jsonl"), "--model", str(trained_bundle),
                     "--output", str(out), "--id-column", "id", "--shard-size", "5", "--batch-size", "4",
                     "--allow-network", "127.0.0.1/32", "--timeout", "1", "--deadline", "2", "--no-progress"])
    finally:
        server.close()
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    output = sorted(read_output(str(out)), key=lambda r: r["row"])
    assert len(output) == len(rows) + 1 and len({r["row"] for r in output}) == len(output)
    by_id = {r["id"]: r for r in output}
    for i, (value, status) in enumerate(rows):
        row = by_id[f"r{i}"]
        assert row["url"] == value, (row["url"], value)  # verbatim, never resolved or trimmed
        assert row["status"] == status, (value, row["status"], row["error"])
        assert (row["caption"] is not None) == (status == "ok")
    assert by_id["row-4"]["status"] == "bad_row"
    # The secret stays in the url cell the user wrote: never in an error, a log line or another column.
    rest = json.dumps([{k: v for k, v in r.items() if k != "url"} for r in output]) + printed.out + printed.err
    assert SECRET not in rest and "token=" not in rest


def test_admission_reads_only_urls_unless_told():
    config = BulkConfig("m", "b", "o")
    row = {"url": "/data/x.jpg", "source": "/data/x.jpg"}
    with pytest.raises(CaptioningError) as err:
        admit(row["url"], row["source"], config)
    assert err.value.reason == "bad_url" and "--allow-local-files" in err.value.message
    assert admit(row["url"], row["source"], replace(config, allow_local_files=True)) == "/data/x.jpg"
    assert admit("file:///d/x.jpg", "/d/x.jpg", replace(config, allow_local_files=True)) == "/d/x.jpg"
    assert admit("s3://b/k", "s3://b/k", replace(config, allow_s3_sources=True)) == "s3://b/k"
    for value, reason in (("s3://b/k", "unsupported_scheme"), ("file:///etc/passwd", "unsupported_scheme"),
                          ("gopher://h/x", "unsupported_scheme"), ("", "bad_url")):
        with pytest.raises(CaptioningError) as err:
            admit(value, value, config)
        assert err.value.reason == reason, value
    assert admit("HTTPS://h/x", "", config) == "HTTPS://h/x"


def test_opted_in_local_reads_are_capped_and_never_hang(tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "big.jpg").write_bytes(b"\xff" * 5000)
    storage = Storage()
    for path, reason in ((fifo, "unreadable"), ("/dev/zero", "unreadable"), (tmp_path / "big.jpg", "too_large")):
        with pytest.raises(CaptioningError) as err:
            storage.read_bytes(str(path), max_bytes=1000)
        assert err.value.reason == reason, path


def test_one_rows_surprise_is_its_status_not_a_failed_shard(images, tmp_path, monkeypatch, caplog):
    server = LoopbackServer()
    try:
        for i in range(3):
            server.routes[f"/{i}.jpg"] = Reply(200, images[i].read_bytes())
        config, storage = stage_config(server, tmp_path, [server.url(f"/{i}.jpg") for i in range(3)])
        real = fetching.decode_with_size
        monkeypatch.setattr(errors, "_logged_internal", set())  # log the first one again, whatever ran before

        def sometimes_broken(data, source, *args):
            if source.endswith("/1.jpg"):
                raise RuntimeError(f"decoder bug at {source}?sig={SECRET}")
            return real(data, source, *args)

        monkeypatch.setattr("captioning.shards.fetching.decode_with_size", sometimes_broken)
        plan_shards(config, storage)
        fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config))
    finally:
        server.close()
    rows = fetched.rows
    assert [r.status for r in rows] == ["ok", "internal_error", "ok"] and len(fetched.images) == 2
    assert rows[1].error.startswith("RuntimeError: decoder bug") and SECRET not in rows[1].error
    assert any("internal error" in r.message and r.exc_info for r in caplog.records)


def stage_config(server, tmp_path, urls, ids=None, **overrides) -> tuple[BulkConfig, Storage]:
    ids = ids or [f"r{i}" for i in range(len(urls))]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"id": i, "url": u}) + "\n" for i, u in zip(ids, urls)))
    config = BulkConfig(str(tmp_path / "m.jsonl"), "unused", str(tmp_path / "out"),
                        ManifestSpec(image_column="url", id_column="id"), shard_size=len(urls), batch_size=4,
                        fetch=LOOPBACK)
    return replace(config, **overrides), Storage()


def test_retry_after_a_crash_before_the_marker_keeps_every_rows_own_map(images, trained_bundle, tmp_path,
                                                                     monkeypatch):
    server = LoopbackServer()
    phase = {"n": 0}  # run 1: b and c fail; run 2: c still fails; run 3: all fine
    server.routes["/a.jpg"] = Reply(200, images[0].read_bytes())
    server.routes["/b.jpg"] = lambda _: Reply(503) if phase["n"] < 1 else Reply(200, images[1].read_bytes())
    server.routes["/c.jpg"] = lambda _: Reply(503) if phase["n"] < 2 else Reply(200, images[2].read_bytes())
    try:
        urls = [server.url(f"/{name}.jpg") for name in "abc"]
        config, storage = stage_config(server, tmp_path, urls, ids=["a", "../../escape", "c"], attention_png=3,
                                       model=str(trained_bundle))
        captioner = CaptionShard(config)

        def one_run(crash_before_marker: bool = False) -> None:
            todo, _ = plan_shards(config, storage)
            assert todo == [0]
            writer = CaptionWriter(config)
            item = captioner(fetch_shard(ShardInput(0), config, writer))
            if not crash_before_marker:
                writer.write(item)
                return
            def crashing(real):
                def crash(self, target, *args):
                    if "/_committed/" in target:
                        raise OSError("killed between the Parquet write and the marker")
                    return real(self, target, *args)
                return crash

            with monkeypatch.context() as patch:  # the marker is a conditional create or replace
                for name in ("write_bytes", "create", "replace_if"):
                    patch.setattr(Storage, name, crashing(getattr(Storage, name)))
                with pytest.raises(OSError):
                    writer.write(item)

        one_run()
        phase["n"], config = 1, replace(config, retry_failed=True)
        one_run(crash_before_marker=True)
        phase["n"] = 2
        one_run()
    finally:
        server.close()
    out = str(tmp_path / "out")
    rows = sorted(read_output(out), key=lambda r: r["row"])
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert len({r["attention_file"] for r in rows}) == 3  # one file per attempt that captioned something
    for row, path in zip(rows, images[:3]):
        from captioning.images import decode_image

        image = decode_image(path.read_bytes(), str(path), config.image)
        expected = captioner.generator(captioner.bundle.backbone(image[np.newaxis])).attention[0]
        np.testing.assert_allclose(attention_for(row, out).astype(np.float32), expected, atol=2e-3)
    # Ids are manifest data: an id of ../../escape becomes a hashed name inside attention-png/.
    pngs = sorted(p.name for p in (tmp_path / "out" / "attention-png").iterdir())
    assert pngs == sorted([f"{file_id('../../escape')}.png", "a.png", "c.png"])
    assert not (tmp_path / "escape.png").exists() and rows[1]["attention_png"].startswith("attention-png/id-")


@pytest.mark.ray
def test_changed_reruns_are_refused_before_any_work(ray_session, trained_bundle, images, tmp_path):
    from jobs.batch import run

    server = LoopbackServer()
    try:
        urls = []
        for i in range(6):
            server.routes[f"/{i}.jpg"] = Reply(200, images[i].read_bytes())
            urls.append(server.url(f"/{i}.jpg"))
        config, storage = stage_config(server, tmp_path, urls[:5], model=str(trained_bundle), shard_size=2)
        manifest = Path(config.manifest)
        original = manifest.read_text()
        assert run(config, log=lambda _: None, progress=False)["rows"] == 5
        out = Path(config.output)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        hits = sum(server.hits.values())

        def refused(changed: BulkConfig, *expected: str) -> None:
            with pytest.raises(CaptioningError) as err:
                run(changed, log=lambda _: None, progress=False)
            for text in ("new --output", *expected):
                assert text in str(err.value), str(err.value)
            assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
            assert sum(server.hits.values()) == hits  # and nothing fetched

        refused(replace(config, shard_size=3), "shard_size 2 -> 3")
        manifest.write_text(json.dumps({"id": "r5", "url": urls[5]}) + "\n" + original)  # a row inserted first
        refused(config, "manifest", "its first 5 rows changed")
        manifest.write_text(original.replace("/3.jpg", "/5.jpg"))  # a URL edited in place, same size
        refused(config, "manifest")
        refused(replace(config, spec=replace(config.spec, caption_column="text")), "caption_column 'caption' -> 'text'")
        manifest.write_text(original)
        again = run(config, log=lambda _: None, progress=False)  # the original plan still runs
        assert again["rows"] == 5 and again["rows_processed_this_run"] == 0

        # A second run while the first holds the output's lease is refused at once, naming the holder.
        with Lease(storage, uri(config.output, "_lease.json"), log=lambda _: None):
            with pytest.raises(LeaseHeld, match=r"another .* is writing this output: host .*pid"):
                run(config, log=lambda _: None, progress=False)
    finally:
        server.close()


def test_markers_are_checked_by_range_not_only_by_count(tmp_path):
    from captioning.shards.summary import check_ranges

    config = BulkConfig("m", "b", str(tmp_path), shard_size=4)
    good = [{"shard": 0, "first_row": 0, "last_row": 3, "rows": 4}, {"shard": 1, "first_row": 4, "last_row": 5, "rows": 2}]
    ranges = {0: (0, 3), 1: (4, 5)}
    check_ranges(config, good, ranges)
    shifted = [good[0], {"shard": 1, "first_row": 3, "last_row": 4, "rows": 2}]  # same counts, other rows
    with pytest.raises(CaptioningError, match="shard\\(s\\) 1 hold other rows"):
        check_ranges(config, shifted, ranges)
    with pytest.raises(CaptioningError, match="1/2 shards committed; rerun"):
        check_ranges(config, good[:1], ranges)
    with pytest.raises(CaptioningError, match="hold other rows"):
        check_ranges(config, good + [{"shard": 2, "first_row": 6, "last_row": 6, "rows": 1}], ranges)


def test_file_ids_never_leave_their_folder():
    assert file_id("r17") == "r17" and file_id("img_3.v2") == "img_3.v2"
    for hostile in ("../../x", "/etc/passwd", "..", ".", "a/b", "x" * 300, "", "c:\\win", "\x00"):
        name = file_id(hostile)
        assert name.startswith("id-") and "/" not in name and "\\" not in name and len(name) < 40


def test_a_fetched_shard_records_what_fetching_and_decoding_cost_in_cpu(images, tmp_path):
    server = LoopbackServer()
    try:
        for i in range(4):
            server.routes[f"/{i}.jpg"] = Reply(200, images[i].read_bytes())
        server.routes["/gone.jpg"] = Reply(404, b"no")
        config, storage = stage_config(server, tmp_path, [server.url(f"/{i}.jpg") for i in range(4)]
                                       + [server.url("/gone.jpg")])
        plan_shards(config, storage)
        fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config))
    finally:
        server.close()
    seconds = fetched.timing[0].seconds
    assert [r.status for r in fetched.rows].count("ok") == 4
    # Thread CPU clocks, beside the wall times: positive, and no more than the threads' wall time in each.
    assert 0 < seconds["decode_cpu"] <= seconds["decode"] + 0.01
    assert 0 < seconds["fetch_cpu"] <= seconds["fetch"] + 0.01


def test_bodies_waiting_for_the_decoders_are_bounded_by_the_fetch_threads(images, tmp_path, monkeypatch):
    server = LoopbackServer()
    waiting, most = [0], [0]
    lock = __import__("threading").Lock()
    real_fetch, real_decode = fetching.RowLoader.fetch, fetching.RowLoader.decode

    def fetch(self, row):
        out = real_fetch(self, row)
        with lock:
            waiting[0] += 1
            most[0] = max(most[0], waiting[0])
        return out

    def slow_decode(self, *fetched):
        __import__("time").sleep(0.02)  # decoding slower than fetching: bodies would pile up unbounded
        with lock:
            waiting[0] -= 1
        return real_decode(self, *fetched)

    monkeypatch.setattr(fetching.RowLoader, "fetch", fetch)
    monkeypatch.setattr(fetching.RowLoader, "decode", slow_decode)
    try:
        for i in range(40):
            server.routes[f"/{i}.jpg"] = Reply(200, tagged_jpeg(images[i % len(images)].read_bytes(), str(i).encode()))
        config, storage = stage_config(server, tmp_path, [server.url(f"/{i}.jpg") for i in range(40)],
                                       fetch_threads=4)
        plan_shards(config, storage)
        fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config))
    finally:
        server.close()
    assert [r.status for r in fetched.rows] == ["ok"] * 40 and len(fetched.images) == 40
    assert most[0] <= 4
