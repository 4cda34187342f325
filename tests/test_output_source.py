"""A WebDataset bulk output as the manifest of features and training: its own images, no request to the web."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from captioning.bulk import BulkConfig, read_output
from captioning.errors import CaptioningError
from captioning.manifest import ManifestSpec, iter_rows, read_manifest
from captioning.output_source import bulk_output_format
from captioning.storage import Storage
from cli.main import main
from tests.conftest import PATIENT_LOOPBACK, LoopbackServer, Reply, tagged_jpeg

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def outputs(ray_session, trained_bundle, synthetic_data, tmp_path_factory):
    """One bulk run's WebDataset and Parquet outputs of 18 rows (16 images, a 404, a repeated URL), made while
    the image server ran; it is stopped before any test reads them."""
    from jobs.batch import run

    root = tmp_path_factory.mktemp("outputs")
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))
    server = LoopbackServer()
    try:
        for i in range(16):
            server.routes[f"/{i}.jpg"] = Reply(200, tagged_jpeg(images[i % len(images)].read_bytes(), str(i).encode()))
        urls = [server.url(f"/{i}.jpg") for i in range(16)] + [server.url("/gone.jpg"), server.url("/3.jpg")]
        (root / "m.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "url": u, "caption": f"reference {i}"}) + "\n"
                                              for i, u in enumerate(urls)))
        config = BulkConfig(str(root / "m.jsonl"), str(trained_bundle), str(root / "wds"),
                            ManifestSpec(image_column="url", id_column="id"), shard_size=8, batch_size=8,
                            fetch=PATIENT_LOOPBACK, output_format="webdataset")
        assert run(config, log=lambda _: None, progress=False)["statuses"] == {"ok": 16, "http_404": 1,
                                                                               "duplicate": 1}
        run(replace(config, output=str(root / "parquet"), output_format="parquet"), log=lambda _: None,
            progress=False)
    finally:
        server.close()  # from here on, any request to it would fail
    return root, server


def test_a_webdataset_output_reads_as_a_manifest_of_its_own_images(outputs):
    root, _ = outputs
    storage = Storage()
    assert bulk_output_format(str(root / "wds"), storage) == "webdataset"
    assert bulk_output_format(str(root / "parquet"), storage) == "parquet"
    assert bulk_output_format(str(root / "m.jsonl"), storage) is None
    rows = list(iter_rows(str(root / "wds")))
    # Every ok row and the duplicate (it shares row 4's image), never the 404; each names its tar member.
    assert [r.row for r in rows] == list(range(1, 17)) + [18]
    assert all("/shards/shard-0000" in r.image and ".tar#" in r.image for r in rows)
    assert rows[-1].image == rows[3].image and rows[-1].captions == ("reference 17",)
    assert rows[0].captions == ("reference 0",)
    generated = list(iter_rows(str(root / "wds"), ManifestSpec(use_generated=True)))
    captions = {r["row"]: r["caption"] for r in read_output(str(root / "wds"), shared=True)}
    assert all(r.captions == (captions[r.row],) for r in generated)
    # Grouped by image as any manifest is: the repeated URL's reference joins row 4's.
    example = next(e for e in read_manifest(str(root / "wds")).examples if e.row == 4)
    assert example.captions == ("reference 3", "reference 17")
    with pytest.raises(CaptioningError, match="is a bulk output in Parquet, which keeps no images"):
        list(iter_rows(str(root / "parquet")))


def test_features_and_training_from_a_webdataset_output_never_touch_the_web(outputs, tmp_path, capsys):
    root, server = outputs
    hits = sum(server.hits.values())
    code = main(["features", "--manifest", str(root / "wds"), "--out", str(tmp_path / "fs"), "--weights", "none",
                 "--shard-size", "8", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    markers = [json.loads(p.read_text()) for p in (tmp_path / "fs" / "_committed").glob("*.json")]
    assert sum(m["rows"] for m in markers) == 17 and sum(m["images"] for m in markers) == 17
    code = main(["train", "--train", str(root / "wds"), "--val", str(root / "wds"), "--out", str(tmp_path / "model"),
                 "--weights", "none", "--epochs", "1", "--d-model", "32", "--layers", "1", "--max-length", "12",
                 "--batch-size", "8", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert (tmp_path / "model" / "bundle.json").exists()
    assert sum(server.hits.values()) == hits  # not one request: the server is stopped anyway

    code = main(["features", "--manifest", str(root / "parquet"), "--out", str(tmp_path / "fs2"), "--weights", "none",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith(f"error: {root / 'parquet'}: is a bulk output in Parquet, which keeps "
                                            "no images")
    assert not Path(tmp_path / "fs2" / "_committed").exists()
    # Refused before anything else, the default (downloaded, here unreachable) backbone weights included.
    for command in (["features", "--manifest", str(root / "parquet"), "--out", str(tmp_path / "fs3")],
                    ["train", "--train", str(root / "parquet"), "--val", str(root / "wds"), "--out",
                     str(tmp_path / "m3")]):
        code = main(command + ["--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and "is a bulk output in Parquet, which keeps no images" in err[-1] and len(err) <= 2, err


def test_retraining_finds_a_webdataset_output_under_its_prefix_as_one_manifest(outputs, tmp_path):
    import shutil

    from captioning.registry import Registry
    from jobs.retrain import combined_manifest, find_new

    root, _ = outputs
    prefix = tmp_path / "incoming"
    shutil.copytree(root / "wds", prefix / "night-1")
    (prefix / "extra.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "a"}) + "\n")
    found = find_new(Registry(str(tmp_path / "registry")), str(prefix), Storage())
    # The output's own _input/*.jsonl are not manifests; the output is one, fingerprinted by its _SUCCESS.json.
    assert [f["uri"] for f in found] == [str(prefix / "extra.jsonl"), str(prefix / "night-1")]
    assert found[1]["sha256"] == Storage().describe(str(prefix / "night-1" / "_SUCCESS.json"))["sha256"]
    rows = combined_manifest(found[1:], ManifestSpec(), Storage(), tmp_path / "train.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert rows == 17 and all(".tar#" in line["image"] for line in lines)


def test_a_webdataset_output_on_s3_feeds_the_features_job(ray_session, trained_bundle, synthetic_data, tmp_path,
                                                          capsys):
    from jobs.batch import run

    storage = Storage(client=ray_session.client())
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[:6]
    server = LoopbackServer()
    try:
        for i, path in enumerate(images):
            server.routes[f"/{i}.jpg"] = Reply(200, tagged_jpeg(path.read_bytes(), str(i).encode()))
        manifest = "".join(json.dumps({"id": f"r{i}", "url": server.url(f"/{i}.jpg"), "caption": f"reference {i}"})
                           + "\n" for i in range(len(images)))
        storage.write_bytes("s3://outputs/wds-in/m.jsonl", manifest.encode())
        config = BulkConfig("s3://outputs/wds-in/m.jsonl", str(trained_bundle), "s3://outputs/wds-src",
                            ManifestSpec(image_column="url", id_column="id"), shard_size=4, batch_size=4,
                            fetch=PATIENT_LOOPBACK, output_format="webdataset", keep_original=True)
        assert run(config, log=lambda _: None, progress=False)["statuses"] == {"ok": 6}
    finally:
        server.close()
    rows = list(iter_rows("s3://outputs/wds-src", storage=storage))
    assert len(rows) == 6 and all(r.image.startswith("s3://outputs/wds-src/shards/") for r in rows)
    from captioning.images import read_source

    assert read_source(rows[0].image, None, storage) == tagged_jpeg(images[0].read_bytes(), b"0")
    code = main(["features", "--manifest", "s3://outputs/wds-src", "--out", "s3://outputs/wds-features",
                 "--weights", "none", "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    markers = [json.loads(storage.read_bytes(m)) for m in storage.list("s3://outputs/wds-features/_committed/")]
    assert sum(m["images"] for m in markers) == 6
