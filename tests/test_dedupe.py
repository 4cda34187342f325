"""Each URL fetched once, equal bytes captioned once, and URLs earlier outputs hold skipped (--skip-seen)."""

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from captioning.bulk import BulkConfig, Captioning, read_output
from captioning.errors import CaptioningError
from captioning.manifest import ManifestSpec
from captioning.shards.fetching import fetch_shard, same_bytes_once
from captioning.shards.payloads import FetchedRow, ShardInput
from captioning.shards.plan import plan_shards, url_key
from captioning.storage import Storage
from tests.conftest import PATIENT_LOOPBACK, LoopbackServer, Reply


def jpeg(i: int) -> bytes:
    """A JPEG of its own: a colour per i, and i in a comment, so that no two i give the same bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (i * 5 % 256, 255 - i * 3 % 256, i * 11 % 256)).save(buffer, "JPEG",
                                                                                  comment=str(i).encode())
    return buffer.getvalue()


def manifest(path: Path, urls: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": f"r{i}", "url": url}) + "\n" for i, url in enumerate(urls)))
    return str(path)


def config_for(manifest_path: str, output: str, **overrides) -> BulkConfig:
    return replace(BulkConfig(manifest_path, "unused", output, ManifestSpec(image_column="url", id_column="id"),
                              shard_size=16, batch_size=8, fetch=PATIENT_LOOPBACK), **overrides)


def planned(output: str, shards: int) -> list[dict]:
    return [json.loads(line) for shard in range(shards)
            for line in (Path(output) / "_input" / f"shard-{shard:05d}.jsonl").read_text().splitlines()]


def test_planning_names_each_rows_first_url_and_hashes_the_same_rows_whatever_it_decides(tmp_path):
    urls = [f"http://127.0.0.1:9/{i % 5}.jpg" for i in range(12)] + ["  http://127.0.0.1:9/0.jpg "]
    path = manifest(tmp_path / "m.jsonl", urls)
    todo, layout = plan_shards(config_for(path, str(tmp_path / "a")), Storage(), dedupe=True)
    rows = planned(str(tmp_path / "a"), layout.shards)
    # JSONL rows are numbered from 1: rows 6.. repeat rows 1-5, and the padded cell is row 1's URL.
    assert [r["duplicate_of"] for r in rows] == [None] * 5 + [1, 2, 3, 4, 5, 1, 2, 1]
    seen = {url_key("http://127.0.0.1:9/3.jpg"): "s3://b/earlier"}
    plan_shards(config_for(path, str(tmp_path / "b")), Storage(), dedupe=False, seen=seen)
    assert [r["seen_in"] for r in planned(str(tmp_path / "b"), layout.shards)] == \
        [None, None, None, "s3://b/earlier"] + [None] * 4 + ["s3://b/earlier"] + [None] * 4
    plans = [json.loads((tmp_path / out / "_plan.json").read_text())["generations"][0]["rows_sha256"] for out in "ab"]
    assert plans[0] == plans[1]  # what a run decides about rows is not part of the rows' hash


def test_a_shards_equal_bytes_are_captioned_once():
    def row(n: int, digest: str | None, status: str = "ok") -> tuple[FetchedRow, object]:
        return FetchedRow(n, n, f"r{n}", "u", "u", None, [], None, status=status, sha256=digest), object()

    out = same_bytes_once([row(1, "a"), row(2, "b"), row(3, "a"), row(4, None, "http_404"), row(5, "b")])
    assert [(r.status, r.duplicate_of, image is None) for r, image in out] == [
        ("ok", None, False), ("ok", None, False), ("duplicate", 1, True), ("http_404", None, False),
        ("duplicate", 2, True)]


def test_duplicate_and_seen_rows_are_not_requested_and_every_row_has_its_sha256(tmp_path):
    server = LoopbackServer()
    try:
        for i in range(3):
            server.routes[f"/{i}.jpg"] = Reply(200, jpeg(i))
        urls = [server.url(f"/{i}.jpg") for i in (0, 1, 0, 2, 1)]
        config = config_for(manifest(tmp_path / "m.jsonl", urls), str(tmp_path / "out"))
        plan_shards(config, Storage(), dedupe=True, seen={url_key(urls[3]): "earlier"})
        from captioning.bulk import CaptionWriter

        fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config))
    finally:
        server.close()
    assert [r.status for r in fetched.rows] == ["ok", "ok", "duplicate", "seen", "duplicate"]
    assert dict(server.hits) == {"/0.jpg": 1, "/1.jpg": 1}  # nothing for the duplicates or the seen URL
    assert [r.sha256 for r in fetched.rows[:2]] == [hashlib.sha256(jpeg(i)).hexdigest() for i in (0, 1)]
    assert len(fetched.images) == 2 and fetched.rows[3].seen_in == "earlier"


def test_skip_seen_refuses_what_is_not_an_earlier_output(tmp_path):
    config = config_for("m.jsonl", str(tmp_path / "out"), skip_seen=(str(tmp_path / "nothing"),))
    with pytest.raises(CaptioningError, match="nothing: is not a bulk captioning output"):
        Captioning().seen(config, Storage())
    with pytest.raises(CaptioningError, match="is this run's own --output"):
        Captioning().seen(replace(config, skip_seen=(str(tmp_path / "out"),)), Storage())


@pytest.mark.ray
def test_a_run_fetches_each_url_once_captions_equal_bytes_once_and_skips_what_earlier_outputs_hold(
        ray_session, trained_bundle, tmp_path):
    from jobs.batch import run

    server = LoopbackServer()
    try:
        for i in range(60):
            server.routes[f"/u{i}.jpg"] = Reply(200, jpeg(i))
        server.routes["/u1.jpg"] = Reply(200, jpeg(0))  # the same bytes as u0, in the same shard
        server.routes["/u40.jpg"] = Reply(200, jpeg(3))  # the same bytes as u3, three shards later
        urls = [server.url(f"/u{i % 50}.jpg") for i in range(100)]
        config = config_for(manifest(tmp_path / "m.jsonl", urls), str(tmp_path / "first"), model=str(trained_bundle),
                            actors=1)
        summary = run(config, log=lambda _: None, progress=False)
        assert server.fetches() == 50 and set(server.hits.values()) == {1}  # robots.txt once for the job
        rows = sorted(read_output(config.output), key=lambda r: r["row"])
        assert len(rows) == 100 and [r["url"] for r in rows] == urls  # every row, verbatim, in order
        by_url = [r for r in rows if r["row"] > 50]
        assert all(r["status"] == "duplicate" and r["duplicate_of"] == r["row"] - 50 for r in by_url)
        assert rows[1]["status"] == "duplicate" and rows[1]["duplicate_of"] == 1  # u1: u0's bytes
        assert rows[1]["sha256"] == rows[0]["sha256"] == hashlib.sha256(jpeg(0)).hexdigest()
        pair = rows[3], rows[40]  # u3 and u40: one captioned, the other its duplicate, whichever ran first
        assert sorted(r["status"] for r in pair) == ["duplicate", "ok"] and pair[0]["sha256"] == pair[1]["sha256"]
        kept = next(r for r in pair if r["status"] == "ok")
        assert next(r for r in pair if r is not kept)["duplicate_of"] == kept["row"]
        markers = [json.loads(p.read_text()) for p in (Path(config.output) / "_committed").glob("*.json")]
        assert sum(m["images"] for m in markers) == 48  # 50 URLs, two of them bytes already captioned
        assert summary["statuses"] == {"ok": 48, "duplicate": 52}
        shared = sorted(read_output(config.output, shared=True), key=lambda r: r["row"])
        assert all(r["status"] == "ok" and r["caption"] for r in shared)
        assert shared[1]["caption"] == shared[0]["caption"] and shared[1]["attention_file"] == shared[0]["attention_file"]

        # Tomorrow's manifest: ten URLs of today's and five new ones, skipping what today's output holds.
        hits = server.fetches()
        tomorrow = urls[:10] + [server.url(f"/u{i}.jpg") for i in range(50, 55)]
        second = replace(config, manifest=manifest(tmp_path / "m2.jsonl", tomorrow), output=str(tmp_path / "second"),
                         skip_seen=(config.output,))
        lines: list[str] = []
        assert run(second, log=lines.append, progress=False)["statuses"] == {"seen": 10, "ok": 5}
        assert server.fetches() - hits == 5
        assert any("50 URLs seen in earlier outputs are skipped" in line for line in lines), lines
        assert {r["seen_in"] for r in read_output(second.output) if r["status"] == "seen"} == {config.output}
    finally:
        server.close()
