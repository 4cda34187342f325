"""Every bad input the unattended-operation review found ends in one `error:` line and a non-zero exit, never a
traceback and never exit 0: malformed registry, record, schedule and history objects, impossible crons,
unwritable or misnamed folders, malformed addresses, empty holdouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli.main import main


def registry_at(root: Path) -> Path:
    """A registry with one complete version v0001 (placeholder bundle files), current, with one history event."""
    reg = root / "reg"
    (reg / "claims").mkdir(parents=True)
    (reg / "claims" / "v0001.json").write_text('{"version": "v0001"}')
    (reg / "versions" / "v0001" / "model").mkdir(parents=True)
    (reg / "versions" / "v0001" / "version.json").write_text(json.dumps(
        {"version": "v0001", "parent": None, "decision": "added", "holdout": {"scores": {"bleu4": 0.1, "cider": 0.2}}}))
    (reg / "current.json").write_text(json.dumps({"version": "v0001", "previous": None, "at": "t", "by": "me"}))
    (reg / "history").mkdir()
    (reg / "history" / "000001.json").write_text(json.dumps(
        {"at": "t", "by": "me", "event": "promote", "version": "v0001", "reason": "first"}))
    return reg


def spoil(reg: Path, name: str, text: str) -> None:
    path = reg / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


CASES = {
    # name: (files to spoil in the registry, argv with REG / ROOT placeholders, what the line must say)
    "list, version.json not JSON": ({"versions/v0001/version.json": "{oops"}, ["models", "list", "--registry", "REG"],
                                    "not a valid registry version record"),
    "show, version.json a list": ({"versions/v0001/version.json": "[1]"}, ["models", "show", "v0001", "--registry",
                                                                           "REG"], "not a valid registry version"),
    "promote, string scores": ({"versions/v0001/version.json": json.dumps(
        {"version": "v0001", "holdout": {"scores": {"bleu4": "high"}}})},
        ["models", "promote", "v0001", "--registry", "REG", "--reason", "r"], "holdout.scores.bleu4"),
    "list, garbage current.json": ({"current.json": "\x00garbage"}, ["models", "list", "--registry", "REG"],
                                   "not a valid registry current pointer"),
    "rollback, {} current.json": ({"current.json": "{}"}, ["models", "rollback", "--registry", "REG", "--reason",
                                                           "r"], "'version' is a required property"),
    "caption, garbage current.json": ({"current.json": "garbage"}, ["caption", "registry+REG", "x.jpg"],
                                      "not a valid registry current pointer"),
    "history, malformed event": ({"history/000002.json": '{"event": 3}'}, ["models", "history", "--registry", "REG"],
                                 "not a valid registry history event"),
    "show --html, non-string parent": ({"versions/v0001/version.json": json.dumps({"version": "v0001", "parent": 7})},
                                       ["models", "show", "v0001", "--registry", "REG", "--html", "ROOT/page"],
                                       "parent"),
    "show --html, FOLDER a file": ({"../page": "a file"}, ["models", "show", "v0001", "--registry", "REG", "--html",
                                                           "ROOT/page", "--gallery", "0"], "is a file, not a folder"),
    "show, a version name with a newline": ({}, ["models", "show", "v0001\n", "--registry", "REG"],
                                            "is not a version name"),
    "show, unicode digits": ({}, ["models", "show", "v\u0661\u0662\u0663\u0664", "--registry", "REG"],
                             "is not a version name"),
    "history, missing registry": ({}, ["models", "history", "--registry", "ROOT/nothing"], "no registry here"),
    "list, missing registry": ({}, ["models", "list", "--registry", "ROOT/nothing"], "no registry here"),
    "caption, registry@latest": ({}, ["caption", "registry+REG@latest", "x.jpg"], "names no version"),
    "jobs list, malformed record": ({"../records/captioning-batch-1.json": '{"job_id": 1}'},
                                    ["jobs", "list", "--record", "ROOT/records"], "not a valid job record"),
    "jobs status, malformed address": ({}, ["jobs", "status", "x", "--address", "http://[::1"], "error: "),
    "schedule, malformed schedule.json": ({"../state/schedule.json": "{no"},
                                          ["schedule", "--cron", "0 3 * * *", "--state", "ROOT/state", "--",
                                           "--registry", "r", "--data-prefix", "d", "--holdout", "h", "--val", "v"],
                                          "not a valid schedule record"),
    "schedule, a cron that never fires": ({}, ["schedule", "--cron", "0 0 31 2 *", "--state", "ROOT/s2", "--",
                                               "--registry", "r", "--data-prefix", "d", "--holdout", "h", "--val",
                                               "v"], "never fires"),
    "schedule, seven fields": ({}, ["schedule", "--cron", "0 0 3 * * * 2027", "--state", "ROOT/s3", "--",
                                    "--registry", "r", "--data-prefix", "d", "--holdout", "h", "--val", "v"],
                               "five fields, or six"),
    "schedule, a state that cannot be created": ({"../statefile": "x"},
                                                 ["schedule", "--cron", "0 3 * * *", "--state", "ROOT/statefile/s",
                                                  "--", "--registry", "r", "--data-prefix", "d", "--holdout", "h",
                                                  "--val", "v"], "cannot"),
    "storage serve --dir FILE": ({"../weed": "x"}, ["storage", "serve", "--dir", "ROOT/weed"], "is a file"),
    "data synthetic --train -5": ({}, ["data", "synthetic", "--out", "ROOT/syn", "--train", "-5"],
                                  "at least 0"),
    "show --gallery -1": ({}, ["models", "show", "v0001", "--registry", "REG", "--html", "ROOT/p", "--gallery", "-1"],
                          "at least 0"),
    "add, a corrupt bundle.json": ({"../bundle/bundle.json": "{corrupt", "../bundle/vocabulary.json": "[]",
                                    "../bundle/decoder.weights.h5": "x", "../bundle/backbone.weights.h5": "x"},
                                   ["models", "add", "ROOT/bundle", "--registry", "REG"], "corrupt bundle manifest"),
    "retrain --tolerance 5": ({}, ["retrain", "--registry", "REG", "--data-prefix", "ROOT", "--holdout", "h", "--val",
                                   "v", "--tolerance", "5"], "[0, 1)"),
    "retrain, a mistyped --data-prefix": ({}, ["retrain", "--registry", "REG", "--data-prefix", "ROOT/dta",
                                              "--holdout", "h", "--val", "v"], "no such folder"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_error_line_and_a_non_zero_exit(name, tmp_path, capsys):
    spoiled, argv, expected = CASES[name]
    reg = registry_at(tmp_path)
    for path, text in spoiled.items():
        spoil(reg, path, text)
    argv = [a.replace("REG", str(reg)).replace("ROOT", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exit, after its one line
        code = exit_.code
    out, err = capsys.readouterr()
    assert code not in (0, None), (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # One error line, the last thing said (a command that loads TensorFlow first logs its devices line).
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert expected in errors[0], err


def test_evaluate_on_an_empty_or_all_missing_manifest_is_one_error_line(trained_bundle, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": str(tmp_path / "gone.jpg"), "caption": "a cat"}) + "\n")
    for manifest, expected in ((empty, "nothing to score"), (missing, "nothing to score: none of its 1")):
        code = main(["evaluate", str(trained_bundle), str(manifest), "--no-meteor", "--out", str(tmp_path / "r.json")])
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err


def test_control_characters_from_storage_are_escaped_when_printed(tmp_path, capsys):
    reg = registry_at(tmp_path)
    spoil(reg, "history/000001.json", json.dumps({"at": "t", "by": "me", "event": "promote", "version": "v0001",
                                                  "reason": "ok\x1b]0;owned\x07 \x1b[2J"}))
    assert main(["models", "history", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;owned\\x07" in out
    shutil.rmtree(reg)


def test_an_error_line_never_shows_a_urls_password_or_signature(tmp_path, capsys):
    manifest = "https://user:pw-s3cr3t@127.0.0.1:1/m.csv?X-Amz-Signature=sig-s3cr3t"
    code = main(["batch", "--manifest", manifest, "--model", str(tmp_path / "model"), "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "s3cr3t" not in err and "127.0.0.1:1/m.csv" in errors[0], err


def test_the_report_replaces_a_link_at_its_target_instead_of_writing_through_it(tmp_path, capsys):
    reg = registry_at(tmp_path)
    page = tmp_path / "page"
    page.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (page / "index.html").symlink_to(outside)
    assert main(["models", "show", "v0001", "--registry", str(reg), "--html", str(page), "--gallery", "0"]) == 0
    assert outside.read_text() == "keep me"
    assert not (page / "index.html").is_symlink() and "<h1>v0001</h1>" in (page / "index.html").read_text()
