"""A grown manifest continues its output: old shards kept as they are, new rows in new shards, every row once."""

import gzip
import io
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning.bulk import BulkConfig, read_output
from captioning.errors import CaptioningError
from captioning.manifest import ManifestSpec
from captioning.shards.layout import PLAN, input_uri, uri
from captioning.shards.plan import Layout, plan_record, plan_shards, read_layout
from captioning.storage import Storage
from tests.conftest import PATIENT_LOOPBACK, LoopbackServer, Reply
from tests.test_dedupe import jpeg


def rows(n: int, start: int = 0, host: str = "http://127.0.0.1:9") -> list[dict]:
    return [{"id": f"r{i}", "url": f"{host}/{i}.jpg", "caption": f"caption {i}"} for i in range(start, start + n)]


def write_manifest(path: Path, items: list[dict]) -> None:
    """The manifest in the format its name says: .jsonl, .csv, .jsonl.gz, .parquet or cc .tsv."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(items), path)
        return
    if name.endswith(".csv"):
        text = "id,url,caption\n" + "".join(f"{r['id']},{r['url']},{r['caption']}\n" for r in items)
    elif name.endswith(".tsv"):
        text = "".join(f"{r['caption']}\t{r['url']}\n" for r in items)
    else:
        text = "".join(json.dumps(r) + "\n" for r in items)
    data = text.encode()
    # mtime=0: the same rows compress to the same bytes, so that only growth changes the file
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)


def config_for(manifest: str, output: str, fmt: str = "auto", shard_size: int = 8) -> BulkConfig:
    spec = ManifestSpec(format=fmt, image_column="url", id_column=None if fmt == "cc-tsv" else "id")
    return BulkConfig(manifest, "unused", output, spec, shard_size=shard_size, fetch=PATIENT_LOOPBACK)


def planned_rows(output: str, storage: Storage, layout: Layout) -> list[int]:
    """Every planned row's manifest position, shard by shard, from the shard input files."""
    out = []
    for shard in range(layout.shards):
        lines = storage.read_bytes(input_uri(output, shard)).decode().splitlines()
        out += [json.loads(line)["index"] for line in lines]
    return out


@pytest.mark.parametrize("name,fmt", [("m.jsonl", "auto"), ("m.csv", "auto"), ("m.jsonl.gz", "auto"),
                                      ("m.parquet", "auto"), ("m.tsv", "cc-tsv")])
def test_rows_appended_to_any_format_start_a_generation(tmp_path, name, fmt):
    storage, manifest, output = Storage(), tmp_path / name, str(tmp_path / "out")
    write_manifest(manifest, rows(20))
    config = config_for(str(manifest), output, fmt)
    todo, layout = plan_shards(config, storage)
    assert todo == [0, 1, 2] and layout.rows == 20 and layout.shards == 3 and not layout.continued
    first = {shard: storage.read_bytes(input_uri(output, shard)) for shard in todo}

    write_manifest(manifest, rows(20) + rows(13, start=20))
    todo, layout = plan_shards(config, storage)
    # Shards 0-2 were never committed here, so they are still to do; the 13 new rows start shard 3, not 2's tail.
    assert todo == [0, 1, 2, 3, 4] and layout.continued
    assert layout.ranges() == {0: (0, 7), 1: (8, 15), 2: (16, 19), 3: (20, 27), 4: (28, 32)}
    assert {shard: storage.read_bytes(input_uri(output, shard)) for shard in (0, 1, 2)} == first  # untouched
    assert planned_rows(output, storage, layout) == list(range(33))
    plan = json.loads(storage.read_bytes(uri(output, PLAN)))
    assert [(g["first_row"], g["first_shard"], g["rows"]) for g in plan["generations"]] == [(0, 0, 20), (20, 3, 13)]
    assert plan["generations"][0]["manifest"] != plan["generations"][1]["manifest"]
    assert read_layout(output, storage).ranges() == layout.ranges()

    # The same grown manifest again is the same plan: nothing new, nothing refused.
    todo, again = plan_shards(config, storage)
    assert again.ranges() == layout.ranges() and not again.continued and todo == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("change", ["edited", "inserted", "shrunk", "reordered"])
def test_any_change_inside_the_old_rows_is_refused_and_writes_nothing(tmp_path, change):
    storage, manifest, output = Storage(), tmp_path / "m.jsonl", str(tmp_path / "out")
    old = rows(20)
    write_manifest(manifest, old)
    config = config_for(str(manifest), output)
    plan_shards(config, storage)
    before = {p: p.read_bytes() for p in Path(output).rglob("*") if p.is_file()}
    new = {"edited": old[:5] + [{**old[5], "caption": "changed"}] + old[6:] + rows(4, 20),
           "inserted": rows(1, 99) + old + rows(4, 20),
           "shrunk": old[:-1],
           "reordered": old[1:] + old[:1] + rows(4, 20)}[change]
    write_manifest(manifest, new)
    with pytest.raises(CaptioningError, match=r"was planned with other settings \(manifest .* -> .*its first 20 rows "
                                              r"changed\): rerun with the original manifest"):
        plan_shards(config, storage)
    assert {p: p.read_bytes() for p in Path(output).rglob("*") if p.is_file()} == before


def test_a_grown_manifest_on_s3_continues(seaweed, tmp_path):
    storage = Storage(client=seaweed.client())
    manifest, output = "s3://outputs/grow/m.jsonl.gz", "s3://outputs/grow/out"
    local = tmp_path / "m.jsonl.gz"
    write_manifest(local, rows(10))
    storage.write_bytes(manifest, local.read_bytes())
    config = config_for(manifest, output, shard_size=4)
    assert plan_shards(config, storage)[0] == [0, 1, 2]
    write_manifest(local, rows(10) + rows(3, 10))
    storage.write_bytes(manifest, local.read_bytes())
    todo, layout = plan_shards(config, storage)
    assert layout.continued and todo == [0, 1, 2, 3] and layout.ranges()[3] == (10, 12)
    assert planned_rows(output, storage, layout) == list(range(13))
    write_manifest(local, rows(9) + rows(4, 10))  # row 9 dropped
    storage.write_bytes(manifest, local.read_bytes())
    with pytest.raises(CaptioningError, match="its first 13 rows changed"):
        plan_shards(config, storage)


def test_an_interrupted_plan_is_planned_anew_and_a_version_1_plan_continues_only_unchanged(tmp_path):
    storage, manifest, output = Storage(), tmp_path / "m.jsonl", str(tmp_path / "out")
    write_manifest(manifest, rows(10))
    config = config_for(str(manifest), output, shard_size=4)
    # A first run killed while planning left a record without rows: nothing of it ran, so any manifest plans.
    Path(output).mkdir()
    (Path(output) / PLAN).write_text(json.dumps({**plan_record(config), "generations": []}))
    todo, layout = plan_shards(config, storage)
    assert todo == [0, 1, 2] and layout.rows == 10

    # An output planned by version 1 kept no hash of its rows: it reruns unchanged, but cannot tell growth.
    v1 = {**plan_record(config), "plan_version": 1, "manifest": storage.describe(str(manifest))}
    (Path(output) / PLAN).write_text(json.dumps(v1))
    todo, layout = plan_shards(config, storage)
    assert todo == [0, 1, 2] and json.loads((Path(output) / PLAN).read_text())["plan_version"] == 2
    (Path(output) / PLAN).write_text(json.dumps(v1))
    write_manifest(manifest, rows(12))
    with pytest.raises(CaptioningError, match="was planned with other settings \\(manifest"):
        plan_shards(config, storage)


@pytest.mark.ray
def test_a_nightly_rerun_of_a_grown_manifest_captions_only_the_new_rows(ray_session, trained_bundle, tmp_path):
    from jobs.batch import run

    server = LoopbackServer()
    try:
        for i in range(500):
            server.routes[f"/{i}.jpg"] = Reply(200, jpeg(i))
        host = f"http://127.0.0.1:{server.port}"
        manifest, output = tmp_path / "m.jsonl", tmp_path / "out"
        write_manifest(manifest, rows(300, host=host))
        config = replace(config_for(str(manifest), str(output), shard_size=64), model=str(trained_bundle),
                         batch_size=16)
        first = run(config, log=lambda _: None, progress=False)
        assert first["rows"] == 300 and first["statuses"] == {"ok": 300}
        before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file() and "_SUCCESS" not in p.name
                  and p.name != PLAN}
        hits = server.fetches()

        write_manifest(manifest, rows(300, host=host) + rows(200, start=300, host=host))
        lines: list[str] = []
        second = run(config, log=lines.append, progress=False)
        assert server.fetches() - hits <= 200  # only the new rows fetched
        assert second["rows"] == 500 and second["statuses"] == {"ok": 500} and second["rows_processed_this_run"] == 200
        assert [g["rows"] for g in second["generations"]] == [300, 200]
        assert any("the manifest grew: rows 300+ are new, from shard 5" in line for line in lines), lines
        after = {p: p.read_bytes() for p in before}
        assert after == before  # the first run's files untouched
        out = list(read_output(str(output)))
        assert sorted(r["row"] for r in out) == list(range(1, 501)) and len({r["id"] for r in out}) == 500
        assert all(r["url"] == f"{host}/{int(r['id'][1:])}.jpg" for r in out)  # each row traces to its input

        write_manifest(manifest, rows(299, host=host) + rows(201, start=299, host=host)[1:] + rows(1, 600, host=host))
        with pytest.raises(CaptioningError, match="its first 500 rows changed"):
            run(config, log=lambda _: None, progress=False)
    finally:
        server.close()
