"""Synthetic data -> train -> save -> load -> caption -> evaluate, through the command line."""

import json

import pytest

from cli.main import main


def test_end_to_end(tmp_path, capsys):
    data, model = tmp_path / "data", tmp_path / "model"
    assert main(["data", "synthetic", "--out", str(data), "--train", "120", "--val", "20", "--test", "20",
                 "--seed", "11"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"train: {data / 'train.jsonl'}"
    assert main(["train", "--train", str(data / "train.jsonl"), "--val", str(data / "val.jsonl"), "--out", str(model),
                 "--weights", "none", "--epochs", "2", "--d-model", "32", "--layers", "1", "--max-length", "20",
                 "--learning-rate", "3e-3", "--batch-size", "32", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "epoch 2:" in printed.err and printed.err.count("sample for") == 2  # the log, on stderr
    assert printed.out.startswith("model ") and printed.out.count("\n") == 1  # the result, on stdout
    image = data / "images" / "test" / "000000.jpg"
    assert main(["caption", str(model), str(image), "--attention-plot", str(tmp_path / "a.png")]) == 0
    caption = capsys.readouterr().out.split("\t")[1].strip()
    assert caption and (tmp_path / "a.png").exists()
    assert main(["evaluate", str(model), str(data / "test.jsonl"), "--out", str(tmp_path / "r.json"),
                 "--no-meteor"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scores"]["images"] == 20 and report["failures"] == []
    assert report["model_version"] == json.loads((model / "bundle.json").read_text())["version"]
    assert "BLEU4" in capsys.readouterr().out


@pytest.mark.ray
def test_main_job_demo_runs_every_stage(tmp_path):
    """The README's main command at small sizes: synthetic data, training, captions, evaluation, bulk job."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cli", "demo", "--out", str(tmp_path), "--train", "120",
                           "--val", "20", "--test", "12", "--epochs", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"INFO {stage}" in done.stderr  # progress is logged, timestamped, on stderr
    # Quiet start-up in every process, Ray workers included; plain progress lines, no carriage returns.
    for noise in ("absl", "I0000", "cuInit", "oneDNN", "Token authentication", "streaming_executor", "\r"):
        assert noise not in done.stderr, noise
    assert done.stderr.count("devices: CPU (no GPU visible)") == 1
    assert json.loads((tmp_path / "report.json").read_text())["scores"]["images"] == 12
    assert len(list((tmp_path / "attention").glob("*.png"))) == 4
    success = json.loads((tmp_path / "bulk" / "_SUCCESS.json").read_text())
    assert success["rows"] == 12 and success["statuses"] == {"ok": 12}
    assert len(list((tmp_path / "bulk" / "attention-png").glob("*.png"))) == 4
