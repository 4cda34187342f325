import json
import shutil

import pytest

from cli.main import main


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
    assert "absent.png: cannot read: No such file" in lines[2] and "blocked_address" not in lines[3]
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


@pytest.mark.parametrize("option,value", [("--timeout", "-1"), ("--timeout", "0"), ("--timeout", "nan"),
                                          ("--deadline", "inf"), ("--actor-cpus", "-3"), ("--num-gpus", "-1"),
                                          ("--max-pixels", "0")])
def test_batch_refuses_bad_numbers_before_any_work(capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--manifest", "m.csv", "--model", "m", "--output", "o", option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}" in err and "Traceback" not in err


def test_keep_original_without_webdataset_is_one_error_line(capsys, tmp_path):
    code = main(["batch", "--manifest", "m.csv", "--model", "m", "--output", str(tmp_path / "o"), "--keep-original"])
    err = capsys.readouterr().err
    assert code != 0 and err.strip() == "error: --keep-original: keeps images only in --output-format webdataset"
    assert not (tmp_path / "o").exists()


def test_data_commands_have_no_s3_endpoint_they_would_ignore(capsys):
    with pytest.raises(SystemExit):
        main(["data", "flickr8k", "--out", "x", "--s3-endpoint", "http://127.0.0.1:1"])
    assert "unrecognized arguments: --s3-endpoint" in capsys.readouterr().err


def test_train_honours_s3_endpoint(tmp_path, monkeypatch):
    seen = {}

    def fake_train(train, val, out, config, spec, **kwargs):
        seen["args"], seen["config"] = (train, val, out), config
        raise SystemExit(0)

    monkeypatch.setattr("captioning.train.train", fake_train)
    with pytest.raises(SystemExit):
        main(["train", "--train", "s3://b/t.csv", "--val", "s3://b/v.csv", "--out", "s3://b/m", "--weights", "none",
              "--s3-endpoint", "http://127.0.0.1:9"])
    assert seen["args"] == ("s3://b/t.csv", "s3://b/v.csv", "s3://b/m")  # URIs go down as given, never as paths
    # Manifests, images, features and the bundle are all read and written with it.
    assert seen["config"].storage.s3_endpoint == "http://127.0.0.1:9"


def test_offline_imagenet_weights_are_one_line_with_the_way_out(synthetic_data, tmp_path, capsys, monkeypatch):
    from captioning import features

    def offline(**kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] "
                        "Name or service not known")

    monkeypatch.setitem(features.BACKBONES, "mobilenet_v3_small",
                        features.BackboneSpec(offline, features.BACKBONES["mobilenet_v3_small"].channels))
    code, _, err = run(capsys, "train", "--train", str(synthetic_data["train"]), "--val", str(synthetic_data["val"]),
                       "--out", str(tmp_path / "m"))  # the default --weights imagenet, as a new user runs it
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --weights imagenet: cannot download")
    assert "--weights none" in lines[0] and ".weights.h5" in lines[0]


def test_a_misread_manifest_stops_before_any_work(trained_bundle, tmp_path, capsys):
    (tmp_path / "m.csv").write_text("link,caption\nhttp://h/1.jpg,a\nhttp://h/2.jpg,b\n")  # no "url" column
    code, _, err = run(capsys, "batch", "--manifest", str(tmp_path / "m.csv"), "--model", str(trained_bundle),
                       "--output", str(tmp_path / "out"), "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "first 2 rows are all malformed" in err and "'url'" in err and "--url-column" in err
    # Nothing was planned, so the corrected command starts cleanly into the same output.
    assert not (tmp_path / "out" / "_plan.json").exists() and not (tmp_path / "out" / "_input").exists()


def test_progress_is_a_bar_on_a_terminal_plain_lines_in_a_file_and_nothing_when_off(monkeypatch):
    import argparse
    import io
    import sys

    from tqdm import tqdm

    from captioning import console
    from jobs.options import show_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert show_progress(argparse.Namespace(no_progress=False))
    assert not show_progress(argparse.Namespace(no_progress=True))
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(console.progress(10, "x", "rows"), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, a submitted job's log
    bar = console.progress(10, "x", "rows")
    assert isinstance(bar, console.LineProgress) and not isinstance(bar, tqdm)
    silent = console.progress(10, "x", "rows", enabled=False)
    silent.update(10)
    silent.close()
    assert sys.stderr.getvalue() == ""


def test_every_option_of_every_command_explains_itself_and_shows_its_default():
    import argparse

    from jobs.options import HelpFormatter
    from cli.examples import EXAMPLES
    from cli.main import build_parser, commands_of

    commands = commands_of(build_parser())
    assert len(commands) == len(EXAMPLES) >= 20
    for command in commands:
        formatter = HelpFormatter(command.prog)
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action) or ""
            assert text.strip(), f"{command.prog} {action.option_strings or action.dest}: no help"
            unset = action.default is None or action.default is False or action.default == []
            if action.option_strings and not unset:
                assert "default" in text, f"{command.prog} {action.option_strings[0]}: default not shown"
        shown = command.format_help()
        assert shown.rstrip().splitlines()[-1].strip().startswith("captioning "), f"{command.prog}: no example"
        assert shown.rstrip().splitlines()[-2].strip() == "example:"


def test_train_help_groups_its_options_and_the_command_list_loads_neither_tensorflow_nor_ray():
    import subprocess
    import sys

    from cli.main import build_parser, commands_of

    train = next(c for c in commands_of(build_parser()) if c.prog == "captioning train")
    sections = [line[:-1] for line in train.format_help().splitlines() if line and not line[0].isspace()
                and line.endswith(":")]
    assert sections == ["options", "data", "model", "training", "Ray", "output", "network", "storage", "example"]
    # `captioning --help` stays instant because building every parser imports neither.
    code = ("import sys; from cli.main import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('tensorflow', 'ray', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_backbone_choices_of_the_options_are_the_backbones_there_are():
    from captioning.features import BACKBONES
    from jobs.options import BACKBONE_NAMES

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES)
