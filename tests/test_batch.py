"""The bulk job end to end on local Ray: loopback images (good and bad), output locally and to SeaweedFS."""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from captioning.bulk import BulkConfig, attention_for, read_output
from captioning.config import FetchConfig
from captioning.manifest import ManifestSpec
from captioning.storage import Storage
from tests.conftest import LoopbackServer, Reply, tagged_jpeg

pytestmark = pytest.mark.ray

LOOPBACK_ONLY = FetchConfig(allowed_networks=("127.0.0.1/32",), retries=2, backoff=0.05, read_timeout=1.0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def bad_cases(server: LoopbackServer, good: bytes) -> dict[str, str]:
    """Route -> expected status for every bad (or awkward) case the job must handle."""
    exif = Image.Exif()
    exif[0x0112] = 6
    server.routes.update({
        # Its own bytes: equal bytes under two URLs are captioned once (tests/test_dedupe.py), not the point here.
        "/flaky.jpg": lambda hit: Reply(500) if hit == 1 else Reply(200, tagged_jpeg(good, b"flaky")),
        "/slow.jpg": Reply(200, good, delay=3.0),
        "/loop1.jpg": Reply(302, headers={"Location": "/loop2.jpg"}),
        "/loop2.jpg": Reply(302, headers={"Location": "/loop1.jpg"}),
        "/page.jpg": Reply(200, b"<html>hello</html>", {"Content-Type": "image/jpeg"}),
        "/cut.jpg": Reply(200, good[: len(good) // 3]),
        "/bomb.png": Reply(200, encode(Image.new("1", (20000, 20000)), "PNG")),
        "/gray.png": Reply(200, encode(Image.new("L", (50, 40), 128), "PNG")),
        "/cmyk.jpg": Reply(200, encode(Image.new("CMYK", (50, 40), (0, 50, 100, 0)), "JPEG")),
        "/rgba.png": Reply(200, encode(Image.new("RGBA", (50, 40), (10, 200, 10, 100)), "PNG")),
        "/rotated.jpg": Reply(200, encode(Image.new("RGB", (60, 20), (200, 0, 0)), "JPEG", exif=exif)),
    })
    return {"/missing.jpg": "http_404", "/flaky.jpg": "ok", "/slow.jpg": "timeout", "/loop1.jpg": "redirect_loop",
            "/page.jpg": "not_an_image", "/cut.jpg": "corrupt_image", "/bomb.png": "too_large", "/gray.png": "ok",
            "/cmyk.jpg": "ok", "/rgba.png": "ok", "/rotated.jpg": "ok"}


@pytest.fixture(scope="module")
def served(synthetic_data):
    server = LoopbackServer()
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[:10]
    for path in images:
        server.routes[f"/img/{path.name}"] = Reply(200, path.read_bytes(), {"Content-Type": "image/jpeg"})
    expected = {server.url(f"/img/{p.name}"): "ok" for p in images}
    expected |= {server.url(route): status for route, status in bad_cases(server, images[0].read_bytes()).items()}
    expected[f"http://127.0.0.2:{server.port}/private.jpg"] = "blocked_address"
    yield server, expected
    server.close()


def manifest_file(tmp_path, urls, with_bad_row=True):
    lines = ["id,url,caption"] + [f"r{i},{url},reference {i}" for i, url in enumerate(urls)]
    if with_bad_row:
        lines.insert(3, "broken-row-without-url,,")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "m.csv")


def test_every_row_once_with_its_status_local_output(served, ray_session, trained_bundle, tmp_path):
    from jobs.batch import run

    from captioning.registry import Registry, add_bundle

    server, expected = served
    manifest = manifest_file(tmp_path, list(expected))
    # The model comes from a registry: resolved once, and every row says which version captioned it.
    registry = Registry(str(tmp_path / "registry"))
    registry.promote(add_bundle(registry, str(trained_bundle), {}), "for this test")
    ref = f"registry+{tmp_path / 'registry'}"
    config = BulkConfig(manifest, ref, str(tmp_path / "out"), ManifestSpec(image_column="url", id_column="id"),
                        shard_size=8, batch_size=4, fetch=LOOPBACK_ONLY, attention_png=3)
    summary = run(config, log=lambda _: None, progress=False)
    rows = list(read_output(str(tmp_path / "out")))
    assert {r["model"] for r in rows} == {f"{ref}@v0001"} and summary["models"] == [f"{ref}@v0001"]
    assert len(rows) == len(expected) + 1 == summary["rows"]  # the malformed row too
    assert len({r["row"] for r in rows}) == len(rows)
    by_url = {r["url"]: r for r in rows}
    for url, status in expected.items():
        assert by_url[url]["status"] == status, (url, by_url[url]["error"])
    bad_row = next(r for r in rows if r["status"] == "bad_row")
    assert bad_row["row"] == 4 and "url" in bad_row["error"]  # file line 4 (the header is line 1)
    for row in rows:
        if row["status"] == "ok":
            maps = attention_for(row, str(tmp_path / "out"))
            assert row["caption"] and maps.shape == (len(row["caption"].split()), 7, 7)
            assert maps.dtype == np.float16 and np.allclose(maps.astype(np.float32).sum(axis=(1, 2)), 1, atol=1e-2)
            assert row["reference"].startswith("reference") and row["model_version"]
        else:
            assert row["caption"] is None and row["error"]
    assert by_url[next(u for u in expected if u.endswith("/rotated.jpg"))]["width"] == 60  # stored as sent
    assert summary["statuses"]["ok"] == sum(1 for s in expected.values() if s == "ok")
    success = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert success["rows"] == len(rows)
    stages = success["stages"]
    # The bounding stage follows from the report's own figures, and ms/image counts the captioned images.
    from captioning.shards.timings import BUSY_ENOUGH

    secs = stages["seconds"]
    if stages["caption_busy"] >= BUSY_ENOUGH:
        expected_bound = max(("backbone", "decoder"), key=secs.get)
    else:
        expected_bound = "write" if secs["write"] > secs["backbone"] + secs["decoder"] else "fetch/decode"
    assert stages["bound_by"] == expected_bound and stages["why"]
    captioned = sum(1 for r in rows if r["status"] == "ok")
    assert stages["ms_per_image"]["backbone"] == pytest.approx(1000 * secs["backbone"] / captioned, rel=0.02, abs=0.1)
    assert all(stages["seconds"][work] > 0 for work in ("fetch", "decode", "backbone", "decoder", "write"))
    assert stages["actor_init_seconds"] > 0 and stages["startup_seconds"] >= stages["actor_init_seconds"]
    good = [r for r in rows if r["status"] == "ok"]
    assert all(r["fetch_seconds"] > 0 and r["decode_seconds"] > 0 and r["inference_seconds"] > 0 for r in good)
    assert len(list((tmp_path / "out" / "attention-png").glob("*.png"))) == 2  # lines 2 and 3: the first two rows

    # A rerun finds every shard committed and touches nothing.
    hits = sum(server.hits.values())
    again = run(config, log=lambda _: None, progress=False)
    assert again["rows_processed_this_run"] == 0 and sum(server.hits.values()) == hits
    assert again["stages"] == {}  # nothing ran, so nothing to time

    # --retry-failed redoes only the transient failures (the timeout), now that the server is fast.
    server.routes["/slow.jpg"] = Reply(200, server.routes["/gray.png"].body)
    retried = run(BulkConfig(**{**config.__dict__, "retry_failed": True}), log=lambda _: None, progress=False)
    assert retried["rows_processed_this_run"] == 1
    rows = list(read_output(str(tmp_path / "out")))
    assert len(rows) == len(expected) + 1
    assert next(r for r in rows if r["url"].endswith("/slow.jpg"))["status"] == "ok"
    kept = next(r for r in rows if r["url"].endswith("/gray.png"))
    assert attention_for(kept, str(tmp_path / "out")).shape[0] == len(kept["caption"].split())


def test_output_to_seaweedfs(served, ray_session, trained_bundle, tmp_path):
    from jobs.batch import run

    server, expected = served
    urls = [u for u, s in expected.items() if s == "ok"]
    storage = Storage(client=ray_session.client())
    storage.write_bytes("s3://outputs/in/m.csv", open(manifest_file(tmp_path, urls, False), "rb").read())
    config = BulkConfig("s3://outputs/in/m.csv", str(trained_bundle), "s3://outputs/run1",
                        ManifestSpec(image_column="url", id_column="id"), shard_size=5, batch_size=4, fetch=LOOPBACK_ONLY)
    summary = run(config, log=lambda _: None, progress=False)
    assert summary["rows"] == len(urls) and summary["statuses"] == {"ok": len(urls)}
    rows = list(read_output("s3://outputs/run1", storage))
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(len(urls)))
    assert storage.exists("s3://outputs/run1/_SUCCESS.json")
    assert attention_for(rows[0], "s3://outputs/run1", storage).shape[1:] == (7, 7)


def test_too_many_actors_for_the_cpus_is_refused_not_a_hang(served, ray_session, trained_bundle, tmp_path):
    from captioning.errors import CaptioningError
    from jobs.batch import run
    from jobs.driver import check_cpus

    server, expected = served
    config = BulkConfig(manifest_file(tmp_path, list(expected)[:3]), str(trained_bundle), str(tmp_path / "out"),
                        ManifestSpec(image_column="url", id_column="id"), actors=2, fetch=LOOPBACK_ONLY)
    with pytest.raises(CaptioningError, match="--actors.*2 CPUs"):  # 2 x 1 CPU on this 2-CPU local Ray
        run(config, log=lambda _: None, progress=False)
    warnings = []
    check_cpus(config, 2.0, fixed=False, log=warnings.append)  # a cluster may scale up: warn only
    assert len(warnings) == 1 and "fewer --actors" in warnings[0]
    check_cpus(BulkConfig("m", "b", "o", actors=2, actor_cpus=0.5), 2.0, fixed=True, log=warnings.append)
    assert len(warnings) == 1  # 2 x 0.5 CPU leave room for the tasks: neither refused nor warned


def faulty_run(served, ray_session, trained_bundle, tmp_path, proxy, output, window, shards=5):
    """A bulk job whose every storage request (manifest, shards, markers, lease) goes through proxy."""
    from captioning.config import StorageConfig

    server, expected = served
    urls = [u for u, s in expected.items() if s == "ok"]
    Storage(client=ray_session.client()).write_bytes(f"{output}-in/m.csv",
                                                     open(manifest_file(tmp_path, urls, False), "rb").read())
    storage = StorageConfig(s3_endpoint=proxy.endpoint, retry_window=window, retry_base=0.1, retry_cap=1.0)
    config = BulkConfig(f"{output}-in/m.csv", str(trained_bundle), output,
                        ManifestSpec(image_column="url", id_column="id"), shard_size=len(urls) // shards,
                        batch_size=4, fetch=LOOPBACK_ONLY, storage=storage, attention=False)
    return config, urls


def every_row_once(output, urls, ray_session):
    rows = list(read_output(output, Storage(client=ray_session.client())))
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(len(urls)))
    assert {r["url"] for r in rows} == set(urls) and all(r["status"] == "ok" for r in rows)


def test_throttling_and_dropped_connections_on_a_fifth_of_storage_requests_lose_and_duplicate_no_row(
        served, ray_session, trained_bundle, tmp_path):
    from jobs.batch import run
    from tests.faults import FaultProxy

    proxy = FaultProxy(ray_session.endpoint, slowdown=0.15, drop=0.10, seed=5)
    try:
        config, urls = faulty_run(served, ray_session, trained_bundle, tmp_path, proxy, "s3://outputs/throttled", 120)
        # And the server stops for 5 s once a shard is committed: shorter than the window, so the job goes on.
        after_commits(Storage(client=ray_session.client()), "s3://outputs/throttled/_committed/", 1,
                      lambda: proxy.outage(5.0))
        summary = run(config, log=lambda _: None, progress=False)
        assert summary["rows"] == len(urls) and summary["statuses"] == {"ok": len(urls)}
        every_row_once("s3://outputs/throttled", urls, ray_session)
        assert proxy.counts["slowdown"] + proxy.counts["dropped"] >= 0.2 * sum(proxy.counts.values()) - 5
        assert proxy.counts["slowdown"] >= 3 and proxy.counts["dropped"] >= 3, proxy.counts
    finally:
        proxy.close()


def test_a_storage_outage_longer_than_the_window_is_one_error_line_and_a_rerun_resumes(
        served, ray_session, trained_bundle, tmp_path, capsys):
    from jobs.options import guarded
    from jobs.batch import run
    from tests.faults import FaultProxy

    proxy = FaultProxy(ray_session.endpoint)
    storage = Storage(client=ray_session.client())
    try:
        # Storage stops for good once a shard is committed, with a 3 s window: one error line naming the
        # endpoint and how far the job got.
        config, urls = faulty_run(served, ray_session, trained_bundle, tmp_path, proxy, "s3://outputs/outage", 3)
        after_commits(storage, "s3://outputs/outage/_committed/", 1, proxy.down)
        capsys.readouterr()
        assert guarded(lambda: run(config, log=lambda _: None, progress=False) and 0) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {proxy.endpoint}: no answer for 3 s (the storage retry "
                                                   "window)"), err
        assert "of 5 shards are committed, and rerunning the same command resumes from them" in err[0]
        committed = len(storage.list("s3://outputs/outage/_committed/"))
        assert 1 <= committed < 5
        proxy.up()
        summary = run(config, log=lambda _: None, progress=False)  # the rerun: only the rest
        assert summary["rows_processed_this_run"] == len(urls) - committed * (len(urls) // 5)
        every_row_once("s3://outputs/outage", urls, ray_session)
    finally:
        proxy.close()


def after_commits(storage, markers, count, then):
    """Call then() in the background once `count` shards are committed."""
    import threading

    def watch():
        while len(storage.list(markers)) < count:
            time.sleep(0.2)
        then()

    threading.Thread(target=watch, daemon=True).start()
