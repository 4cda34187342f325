"""The promotion gate fails closed, driven with injected values: NaN and missing scores, holdouts scored on too
few or on different images, tolerances outside [0, 1), a holdout too small to claim a version, a mistyped
--data-prefix, a run that fails (or died) after claiming a version: each is recorded as rejected, never taken."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.errors import CaptioningError
from captioning.registry import Registry
from jobs.retrain import RetrainConfig, decide, gate, retrain
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"bleu4": 0.3, "cider": 1.0}


def report(ids, rows, scores=GOOD, captions=None, references=None):
    found = {"scores": scores, "images": list(ids), "rows": rows, "failures": []}
    if captions is not None:
        found.update(captions=captions, references=references)
    return found


def test_nan_or_missing_scores_never_promote():
    assert not decide({"bleu4": 0.3, "cider": 1.0}, {"bleu4": math.nan, "cider": 1.2}, 0.02)[0]
    assert not decide(None, {"bleu4": math.nan, "cider": 1.0}, 0.02)[0]  # not even a first version
    promote, reason = decide({"bleu4": math.inf, "cider": 1.0}, GOOD, 0.02)
    assert not promote and "parent's holdout bleu4 is not a finite number" in reason
    assert not decide(GOOD, {"bleu4": "0.5", "cider": 2.0}, 0.02)[0]  # a string is no score
    assert not decide(GOOD, {"cider": 2.0}, 0.02)[0]


@pytest.mark.parametrize("tolerance", [1.0, 5.0, -0.1, math.nan])
def test_a_tolerance_outside_0_1_is_refused(tolerance):
    with pytest.raises(CaptioningError, match=r"not a relative drop in \[0, 1\)"):
        decide(GOOD, {"bleu4": 0.0, "cider": 0.0}, tolerance)


def test_a_holdout_scored_on_one_image_of_four_is_rejected():
    promote, reason, _, _ = gate(report(["a"], 4), report(["a", "b", "c", "d"], 4), 0.02, 1.0)
    assert not promote and reason.startswith("incomplete evidence: 1 of 4 holdout images were scored by both")
    promote, reason, _, _ = gate(report([], 4, scores=None), None, 0.02, 1.0)  # every image failed
    assert not promote and "0 of 4" in reason
    assert not gate(report([], 0, scores=None), None, 0.02, 0.5)[0]  # an empty holdout
    assert gate(report(["a", "b", "c"], 4), report(["a", "b", "c"], 4), 0.02, 0.75)[0]  # a stated share suffices


def test_candidate_and_parent_are_compared_on_the_very_same_images():
    refs = {i: ["a red square on a blue field"] for i in "abcd"}
    mine = {"a": "a red square on a blue field", "b": "a red square on a blue field",
            "c": "a red square on a blue field"}
    theirs = {"b": "a red square on a blue field", "c": "a red square on a blue field",
              "d": "a green circle"}  # its one bad caption is on an image the candidate never scored
    candidate = report(mine, 4, scores={"bleu4": 1.0, "cider": 10.0}, captions=mine, references=refs)
    parent = report(theirs, 4, scores={"bleu4": 0.6, "cider": 5.0}, captions=theirs, references=refs)
    promote, reason, scores, parent_scores = gate(candidate, parent, 0.02, 0.5)
    assert promote and "on 2 of 4 holdout images" in reason
    assert scores["images"] == parent_scores["images"] == 2  # rescored on b and c, both
    assert scores["bleu4"] == pytest.approx(parent_scores["bleu4"])
    # Without captions to rescore, reports on different images are not compared at all.
    promote, reason, _, _ = gate(report(mine, 4), report(theirs, 4), 0.02, 0.5)
    assert not promote and "scored on different images" in reason


def rows_at(folder: Path, count: int, missing: int = 0) -> list[dict]:
    """count manifest rows whose images are real files, the last `missing` of them never written."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        path = folder / f"{index}.png"
        if index < count - missing:
            Image.new("RGB", (8, 8), (index * 20 % 255, 0, 0)).save(path)
        rows.append({"image": str(path), "caption": f"scene number {index}"})
    return rows


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def place(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "m1.jsonl", rows_at(tmp_path / "images", 6))
    holdout = write(tmp_path / "holdout.jsonl", rows_at(tmp_path / "holdout-images", 4, missing=3))
    val = write(tmp_path / "val.jsonl", rows_at(tmp_path / "val-images", 4))
    return tmp_path, RetrainConfig(registry=str(tmp_path / "registry"), data_prefix=str(data), holdout=holdout,
                                   val=val, train=tiny_config(epochs=1), min_rows=4)


def never_trains(*_args, **_kwargs):
    raise AssertionError("trained although the gate should have refused first")


def test_a_holdout_too_small_is_refused_before_a_version_is_claimed(place, monkeypatch):
    import captioning.train

    monkeypatch.setattr(captioning.train, "train", never_trains)
    root, config = place
    with pytest.raises(CaptioningError, match=r"--holdout has 1 scorable row\(s\).*at least 4"):
        retrain(config, log=lambda _: None, progress=False)
    registry = Registry(config.registry)
    assert registry.versions() == [] and registry.abandoned(max_age=0) == [] and not registry.exists()


def test_a_data_prefix_that_does_not_exist_is_an_error_not_nothing_new(place):
    root, config = place
    with pytest.raises(CaptioningError, match="no such folder"):
        retrain(RetrainConfig(**{**config.__dict__, "data_prefix": str(root / "dta")}), log=lambda _: None)
    (root / "images-only").mkdir()
    (root / "images-only" / "a.png").write_bytes(b"x")
    with pytest.raises(CaptioningError, match="holds 1 file.s. but no training manifest"):
        retrain(RetrainConfig(**{**config.__dict__, "data_prefix": str(root / "images-only")}), log=lambda _: None)


def test_a_run_that_fails_after_claiming_leaves_a_rejected_version_and_a_dead_claim_is_settled(place, monkeypatch):
    import captioning.train

    def fails(*_args, **_kwargs):
        raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(captioning.train, "train", fails)
    root, config = place
    config = RetrainConfig(**{**config.__dict__, "holdout": config.val})
    logs: list[str] = []
    with pytest.raises(RuntimeError):
        retrain(config, log=logs.append, progress=False)
    registry = Registry(config.registry)
    assert registry.versions() == ["v0001"] and registry.current() == (None, None)
    info = registry.info("v0001")
    assert info["promoted"] is False and "the GPU fell off the bus" in info["decision"]
    assert [(e["event"], e["version"]) for e in registry.history()] == [("rejected", "v0001")]
    # A run killed between its claim and its decision: the next run records it as rejected first.
    registry.claim()  # v0002, claimed by this process which "dies": its claim record names a pid that is gone
    claim = Path(config.registry) / "claims" / "v0002.json"
    record = json.loads(claim.read_text())
    claim.write_text(json.dumps({**record, "pid": 2 ** 22 + 7}))
    assert registry.abandoned() == ["v0002"]
    with pytest.raises(RuntimeError):
        retrain(config, log=logs.append, progress=False)
    assert registry.info("v0002")["decision"] == "not promoted: the run that claimed this version stopped before " \
        "deciding"
    assert registry.versions() == ["v0001", "v0002", "v0003"] and registry.abandoned(max_age=0) == []


def test_the_command_refuses_a_tolerance_of_five_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.retrain", "--registry", str(tmp_path), "--data-prefix",
                           str(tmp_path), "--holdout", "h", "--val", "v", "--tolerance", "5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--tolerance" in done.stderr, done.stderr
