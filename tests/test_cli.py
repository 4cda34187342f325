import json
import shutil

import pytest

from captioning.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_caption_greedy_beam_and_attention_plot(trained_bundle, synthetic_data, tmp_path, capsys):
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[:2]
    code, out, _ = run(capsys, "caption", str(trained_bundle), str(images[0]), "--attention-plot",
                       str(tmp_path / "att.png"))
    assert code == 0 and out.startswith(f"{images[0]}\t") and len(out.split("\t")[1].split()) > 0
    assert (tmp_path / "att.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run(capsys, "caption", str(trained_bundle), *map(str, images), "--beam-size", "3", "--top-k", "2",
                       "--json", "--attention-plot", str(tmp_path / "many.png"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["source"] for r in rows] == list(map(str, images))
    assert all(len(r["alternatives"]) == 2 for r in rows)
    assert (tmp_path / "many-0.png").exists() and (tmp_path / "many-1.png").exists()


def test_caption_bad_inputs_one_line_each_and_the_rest_go_on(trained_bundle, synthetic_data, tmp_path, capsys):
    good = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[0]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:300])
    code, out, err = run(capsys, "caption", str(trained_bundle), str(tmp_path / "notes.txt"), str(good),
                         str(tmp_path / "cut.jpg"), str(tmp_path / "absent.png"), "http://127.0.0.1:9/x.jpg",
                         "--temperature", "0.7")
    assert code == 1
    assert out.count("\n") == 1 and str(good) in out
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "notes.txt: not an image" in lines[0] and "cut.jpg: cannot decode" in lines[1]
    assert "absent.png: cannot read file" in lines[2] and "blocked_address" not in lines[3]
    assert "http://127.0.0.1:9/x.jpg" in lines[3] and "--allow-private-networks" in lines[3]


def test_corrupt_model_directory_is_one_line(trained_bundle, tmp_path, capsys):
    bundle = tmp_path / "m"
    shutil.copytree(trained_bundle, bundle, ignore=shutil.ignore_patterns("feature-cache", "checkpoint"))
    (bundle / "vocabulary.json").write_text("[")
    code, _, err = run(capsys, "caption", str(bundle), "x.jpg")
    assert code == 2 and err.count("\n") == 1 and "vocabulary.json: corrupt vocabulary" in err


def test_conflicting_generation_options(trained_bundle, capsys):
    code, _, err = run(capsys, "caption", str(trained_bundle), "x.jpg", "--temperature", "1", "--beam-size", "2")
    assert code == 2 and "not both" in err


def test_batch_size_must_be_positive(trained_bundle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(trained_bundle), "x.jpg", "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size: expected a whole number of at least 1" in capsys.readouterr().err


def test_missing_manifest_for_training(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--train", str(tmp_path / "t.csv"), "--val", str(tmp_path / "v.csv"),
                       "--out", str(tmp_path / "o"), "--weights", "none")
    assert code == 2 and err == f"error: {tmp_path / 't.csv'}: manifest not found\n"


def test_data_synthetic_command(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "synthetic", "--out", str(tmp_path), "--train", "3", "--val", "2")
    assert code == 0 and "train.jsonl" in out
    assert len((tmp_path / "val.jsonl").read_text().splitlines()) == 2


def test_caption_with_reduced_precision(trained_bundle, synthetic_data, capsys):
    image = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[0]
    code, out, _ = run(capsys, "caption", str(trained_bundle), str(image), "--precision", "mixed_bfloat16")
    assert code == 0 and out.split("\t")[1].strip()
