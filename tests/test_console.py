"""What commands show besides their output: plain progress lines in files, levels, quiet TensorFlow."""

import subprocess
import sys

import pytest

from captioning import console


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def lines(monkeypatch):
    said = []

    class Log:
        def info(self, message):
            said.append(message)

    monkeypatch.setattr(console, "log", Log())
    return said


def test_progress_in_a_file_is_a_plain_line_per_tenth_or_per_interval_with_rate_and_eta(monkeypatch, lines):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    bar = console.LineProgress(1000, "epoch 1/3", "batches", every=10.0, min_gap=2.0)
    for _ in range(1000):  # 1000 batches, one every 0.1 s: 100 s in all
        clock.now += 0.1
        bar.update(1)
        bar.set_postfix(loss="2.345")
    bar.close()
    # A line each 10% (every 10 s here), never more often than min_gap, the last one at 100%.
    assert len(lines) == 10
    assert lines[0] == "epoch 1/3: 100/1000 batches (10%), 10.00 batches/s, ETA 1m30s, loss 2.345"
    assert lines[-1] == "epoch 1/3: 1000/1000 batches (100%), 10.00 batches/s, loss 2.345"
    assert not any("\r" in line for line in lines)


def test_slow_progress_says_something_every_interval_and_fast_progress_is_not_a_line_per_step(monkeypatch, lines):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    slow = console.LineProgress(None, "captioning", "rows", every=10.0)
    for _ in range(6):
        clock.now += 5.0
        slow.update(3)
    assert lines == ["captioning: 6 rows, 0.60 rows/s", "captioning: 12 rows, 0.60 rows/s",
                     "captioning: 18 rows, 0.60 rows/s"]
    lines.clear()
    fast = console.LineProgress(10_000, "features", "shards", every=10.0, min_gap=2.0)
    for _ in range(10_000):
        clock.now += 0.0001
        fast.update(1)
    fast.close()
    assert lines == ["features: 10000/10000 shards (100%), 10000.00 shards/s"]  # 1 s in all: only the close


def test_a_resumed_epoch_counts_its_rate_from_where_it_went_on(monkeypatch, lines):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    bar = console.progress(100, "epoch 2/2", "batches", enabled=True, initial=60)
    for _ in range(40):
        clock.now += 1.0
        bar.update(1)
    bar.close()
    assert lines[0].startswith("epoch 2/2: 70/100 batches (70%), 1.00 batches/s, ETA 30s")


def test_a_command_in_a_log_file_shows_no_tensorflow_start_up_and_no_carriage_returns(feature_sets, tmp_path):
    from tests.test_runs import TINY_ARGS

    log = tmp_path / "train.log"
    with open(log, "w") as handle:  # stderr is a file, as in a Ray job log, CI or `2> file`
        done = subprocess.run([sys.executable, "-m", "cli", "train", "--train", feature_sets["train"], "--val",
                               feature_sets["val"], "--out", str(tmp_path / "m"), *TINY_ARGS],
                              stdout=subprocess.PIPE, stderr=handle, text=True, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    for noise in ("absl", "I0000", "E0000", "W0000", "cuInit", "oneDNN", "cudart", "Traceback"):
        assert noise not in text, text
    lines = text.splitlines()
    assert lines[0].endswith(" INFO devices: CPU (no GPU visible)")
    assert all(line[:4].isdigit() and line[10] == "T" and " INFO " in line for line in lines), text
    assert any("epoch 1/2: 2/2 batches (100%)" in line for line in lines), text
    assert done.stdout.startswith("model ") and done.stdout.count("\n") == 1  # the result, on stdout


def test_verbose_shows_the_start_up_lines_again(tmp_path):
    code = "import tensorflow as tf; tf.config.list_physical_devices()"
    quiet = subprocess.run([sys.executable, "-c", f"from captioning import console; console.setup(); {code}"],
                           capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", f"from captioning import console; console.setup(verbose_flag=True); "
                           f"{code}"], capture_output=True, text=True, timeout=120)
    assert quiet.stderr.splitlines() and all("devices: CPU" in line for line in quiet.stderr.splitlines())
    assert "absl" in loud.stderr and "devices:" not in loud.stderr
