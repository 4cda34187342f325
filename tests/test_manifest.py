import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning.errors import ManifestError
from captioning.manifest import ManifestSpec, read_manifest, stable_id


def test_csv_groups_captions_per_image_and_resolves_paths(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,one\nb.jpg,two\na.jpg,three\n")
    manifest = read_manifest(tmp_path / "m.csv")
    assert [(ex.image, ex.captions) for ex in manifest.examples] == [
        (str(tmp_path / "a.jpg"), ("one", "three")), (str(tmp_path / "b.jpg"), ("two",))]
    assert [c for _, c in manifest.pairs()] == ["one", "three", "two"]
    assert manifest.examples[0].id == stable_id(str(tmp_path / "a.jpg"))


def test_tsv_with_custom_columns_and_ids(tmp_path):
    (tmp_path / "m.tsv").write_text("key\tpath\ttext\n7\thttp://example.com/x.jpg\thello\n")
    spec = ManifestSpec(image_column="path", caption_column="text", id_column="key")
    ex = read_manifest(tmp_path / "m.tsv", spec).examples[0]
    assert (ex.id, ex.image, ex.captions) == ("7", "http://example.com/x.jpg", ("hello",))


def test_conceptual_captions_tsv_gzip(tmp_path):
    with gzip.open(tmp_path / "cc.tsv.gz", "wt") as handle:
        handle.write("a dog\thttp://h/1.jpg\nbroken row without tab\na cat\thttp://h/2.jpg\n")
    manifest = read_manifest(tmp_path / "cc.tsv.gz", ManifestSpec(format="cc-tsv"))
    assert [ex.image for ex in manifest.examples] == ["http://h/1.jpg", "http://h/2.jpg"]
    assert len(manifest.errors) == 1
    assert manifest.errors[0].source.endswith("cc.tsv.gz:2") and "caption<TAB>url" in str(manifest.errors[0])


def test_jsonl_lists_and_bad_rows_are_reported_not_dropped(tmp_path):
    lines = [json.dumps({"image": "a.jpg", "caption": ["x", "y"]}), "{not json", json.dumps({"caption": "z"}),
             json.dumps({"image": "b.jpg", "caption": 5})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    manifest = read_manifest(tmp_path / "m.jsonl")
    assert [ex.captions for ex in manifest.examples] == [("x", "y")]
    assert [e.source.rsplit(":", 1)[1] for e in manifest.errors] == ["2", "3", "4"]
    assert "invalid JSON" in str(manifest.errors[0]) and "'image'" in str(manifest.errors[1])


def test_parquet(tmp_path):
    table = pa.table({"image": ["a.jpg", "b.jpg"], "caption": [["p", "q"], ["r"]]})
    pq.write_table(table, tmp_path / "m.parquet")
    manifest = read_manifest(tmp_path / "m.parquet")
    assert [ex.captions for ex in manifest.examples] == [("p", "q"), ("r",)]


def test_csv_row_with_too_many_fields(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,ok\nb.jpg,too,many\n")
    manifest = read_manifest(tmp_path / "m.csv")
    assert len(manifest.examples) == 1 and "fields" in str(manifest.errors[0])


def test_missing_and_unknown_files_name_the_input(tmp_path):
    with pytest.raises(ManifestError, match="nope.csv: manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="m.txt"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="bad.parquet: not a readable Parquet"):
        read_manifest(tmp_path / "bad.parquet")
    (tmp_path / "latin.csv").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="latin.csv: not UTF-8"):
        read_manifest(tmp_path / "latin.csv")


def test_corrupt_gzip_and_deep_json_are_clear_errors(tmp_path):
    import zlib

    raw = bytearray(gzip.compress(b"image,caption\n" + b"a.jpg,x\n" * 2000))
    raw[10] = 0xFF  # the first deflate block header: "invalid block type", raised as zlib.error, not OSError
    (tmp_path / "m.csv.gz").write_bytes(bytes(raw))
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(raw))
    with pytest.raises(ManifestError, match="m.csv.gz: cannot read manifest"):
        read_manifest(tmp_path / "m.csv.gz")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n" + json.dumps({"image": "a.jpg", "caption": "x"}) + "\n")
    manifest = read_manifest(tmp_path / "deep.jsonl")
    assert len(manifest.examples) == 1 and "nested too deeply" in str(manifest.errors[0])


def test_headerless_conceptual_captions_tsv_is_recognised(tmp_path, caplog):
    (tmp_path / "cc.tsv").write_text("a dog on grass\thttp://h/1.jpg\na red car\thttp://h/2.jpg\n")
    manifest = read_manifest(tmp_path / "cc.tsv", ManifestSpec(image_column="url"))
    # Read as cc-tsv with a notice: the first row is a row, not a header, and nothing is a bad row.
    assert [ex.image for ex in manifest.examples] == ["http://h/1.jpg", "http://h/2.jpg"] and not manifest.errors
    assert any("--format cc-tsv" in r.message for r in caplog.records)
    with pytest.raises(ManifestError, match="pass --format cc-tsv"):
        read_manifest(tmp_path / "cc.tsv", ManifestSpec(format="tsv", image_column="url"))
    (tmp_path / "ok.tsv").write_text("url\tcaption\nhttp://h/1.jpg\ta dog\n")  # a real header stays a TSV
    assert [ex.captions for ex in read_manifest(tmp_path / "ok.tsv", ManifestSpec(image_column="url")).examples] \
        == [("a dog",)]


def test_rows_keep_the_cell_as_written_beside_its_resolved_path(tmp_path):
    from captioning.manifest import iter_rows

    (tmp_path / "m.csv").write_text("image,caption\nsub/a.jpg,x\nfile:///data/b.jpg,y\nhttp://h/c.jpg?x=1,z\n"
                                    "ftp://h/d.jpg,w\n")
    rows = list(iter_rows(tmp_path / "m.csv"))
    assert [r.value for r in rows] == ["sub/a.jpg", "file:///data/b.jpg", "http://h/c.jpg?x=1", "ftp://h/d.jpg"]
    assert [r.image for r in rows] == [str(tmp_path / "sub/a.jpg"), "/data/b.jpg", "http://h/c.jpg?x=1",
                                       "ftp://h/d.jpg"]
