"""The model registry: versions, a current pointer moved only by conditional writes (proved against SeaweedFS),
an append-only history, and consumers that resolve `registry+URI` once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from captioning.errors import BundleError, CaptioningError
from captioning.registry import Registry, add_bundle, resolve_model
from captioning.storage import Storage
from cli.main import main


def fake_bundle(folder: Path, tag: str) -> Path:
    """The file names of a bundle with placeholder content: enough for versions, claims and pointers."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("bundle.json", "vocabulary.json", "decoder.weights.h5", "backbone.weights.h5"):
        (folder / name).write_text(f"{tag} {name}")
    return folder


def no_check(_uri: str) -> None:
    pass


def test_versions_promotion_rollback_and_history_in_a_folder(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    assert registry.versions() == [] and registry.current() == (None, None)
    first = add_bundle(registry, str(fake_bundle(tmp_path / "a", "a")), {"decision": "seed"}, verify=no_check)
    assert first == "v0001" and registry.info(first)["parent"] is None
    assert registry.move(first, None, "first model", "promote", verify=no_check)
    second = add_bundle(registry, str(fake_bundle(tmp_path / "b", "b")), {}, verify=no_check)
    assert registry.info(second)["parent"] == "v0001"  # the current version when it was made
    pointer, tag = registry.current()
    assert registry.move(second, tag, "better", "promote", verify=no_check)
    assert not registry.move(first, tag, "stale tag", "promote", verify=no_check)  # tag read before the move
    assert registry.current()[0]["version"] == "v0002" and registry.current()[0]["previous"] == "v0001"
    assert [e["event"] for e in registry.history()] == ["promote", "promote"]
    assert [e["reason"] for e in registry.history()] == ["first model", "better"]
    assert registry.versions() == ["v0001", "v0002"]
    copied = sorted(p.name for p in Path(registry.bundle_uri(second)).iterdir())
    assert copied == ["backbone.weights.h5", "bundle.json", "decoder.weights.h5", "vocabulary.json"]
    with pytest.raises(CaptioningError, match="is not a model bundle"):
        add_bundle(registry, str(tmp_path), {})
    with pytest.raises(CaptioningError, match="not a version name"):
        registry.info("../../etc")


def test_conditional_writes_on_seaweedfs_one_claim_and_one_move_per_race(seaweed, tmp_path):
    storage = Storage(client=seaweed.client())
    prefix = "s3://outputs/registry-race"
    source = str(fake_bundle(tmp_path / "m", "m"))
    # Eight claims at once: eight different numbers (If-None-Match on claims/vNNNN.json).
    versions: list[str] = []
    threads = [threading.Thread(target=lambda: versions.append(Registry(prefix, storage).claim())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [f"v{n:04d}" for n in range(1, 9)]
    registry = Registry(prefix, storage)
    for version in ("v0001", "v0002"):
        for name in ("bundle.json",):
            storage.upload_file(Path(source) / name, f"{registry.bundle_uri(version)}/{name}")
        registry.complete(version, {"parent": None})
    # Two writers read the same (absent) pointer: only one creates it; then both hold the same tag: one moves it.
    assert registry.move("v0001", None, "a", "promote", verify=no_check)
    assert not Registry(prefix, storage).move("v0002", None, "b", "promote", verify=no_check)
    _, tag = registry.current()
    results = []
    racers = [threading.Thread(target=lambda v=v: results.append(
        Registry(prefix, storage).move(v, tag, v, "promote", verify=no_check))) for v in ("v0001", "v0002")]
    for thread in racers:
        thread.start()
    for thread in racers:
        thread.join()
    assert sorted(results) == [False, True]
    events = Registry(prefix, storage).history()
    assert len(events) == 2 and events[-1]["version"] == registry.current()[0]["version"]


def test_a_bundle_that_does_not_load_is_never_pointed_at(trained_bundle, tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    good = add_bundle(registry, str(trained_bundle), {})
    registry.promote(good, "works")
    broken = fake_bundle(tmp_path / "broken", "x")
    (broken / "bundle.json").write_text((trained_bundle / "bundle.json").read_text())
    with pytest.raises(BundleError):  # refused at the door, before a number is taken
        add_bundle(registry, str(broken), {})
    assert registry.abandoned(max_age=0) == []
    bad = add_bundle(registry, str(broken), {}, verify=no_check)  # one that broke after it was added
    with pytest.raises(BundleError):
        registry.promote(bad, "should not happen")
    assert registry.current()[0]["version"] == good and len(registry.history()) == 1


def test_models_commands_and_registry_consumers(trained_bundle, synthetic_data, tmp_path, capsys):
    reg = str(tmp_path / "reg")

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("caption", f"registry+{reg}", "x.jpg")
    assert code == 2 and "no registry here" in err and err.count("\n") == 1
    assert run("models", "add", "--registry", reg, str(trained_bundle), "--promote")[0] == 0
    assert run("models", "add", "--registry", reg, str(trained_bundle))[0] == 0
    code, out, _ = run("models", "promote", "v0002", "--registry", reg, "--reason", "same model, newer")
    assert code == 0 and "v0002 is current (was v0001)" in out
    code, out, _ = run("models", "list", "--registry", reg)
    listed = {line.lstrip("* ").split()[0]: line.startswith("*") for line in out.splitlines()[1:]}
    assert listed == {"v0001": False, "v0002": True}
    code, out, _ = run("models", "rollback", "--registry", reg, "--reason", "bad captions")
    assert code == 0 and "v0001 is current" in out
    code, out, _ = run("models", "history", "--registry", reg)
    assert [line.split()[1] for line in out.splitlines()] == ["promote", "promote", "rollback"]
    assert "bad captions" in out.splitlines()[-1]

    image = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))[0]
    code, out, err = run("caption", f"registry+{reg}", str(image))
    assert code == 0 and out.split("\t")[1].strip() and f"registry+{reg}@v0001" in err
    code, out, err = run("caption", f"registry+{reg}@v0002", str(image))
    assert code == 0 and "@v0002" in err
    assert resolve_model(str(trained_bundle)).bundle == str(trained_bundle)  # plain paths pass through
    info = json.loads(run("models", "show", "v0002", "--registry", reg)[1])
    assert info["parent"] == "v0001" and info["bundle"].endswith("versions/v0002/model")


def promoted_child(registry: Registry, bundle, synthetic_data, decision: str) -> str:
    """A promoted first version and a child of it scored on the holdout against it; returns the child."""
    first = add_bundle(registry, str(bundle), {"decision": "promoted: first version"})
    registry.promote(first, "first")
    return add_bundle(registry, str(bundle), {
        "decision": decision, "manifests": [{"uri": "s3://b/incoming/day2.jsonl"}],
        "holdout": {"manifest": str(synthetic_data["test"]), "scores": {"bleu4": 0.31, "cider": 0.9},
                    "parent_scores": {"bleu4": 0.30, "cider": 1.0}}})


def test_the_html_report_shows_lineage_scores_curves_and_a_gallery_whose_images_exist(
        trained_bundle, synthetic_data, tmp_path, capsys):
    from html.parser import HTMLParser

    registry = Registry(str(tmp_path / "reg"))
    second = promoted_child(registry, trained_bundle, synthetic_data, "promoted: <better> & kept")
    code = main(["models", "show", second, "--registry", str(tmp_path / "reg"), "--html", str(tmp_path / "page"),
                 "--gallery", "3"])
    assert code == 0, capsys.readouterr().err
    page = (tmp_path / "page" / "index.html").read_text()

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.rows = [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            self.rows += tag == "tr"

    links = Links()
    links.feed(page)
    assert "curves.png" in links.images and sum(src.startswith("gallery/") for src in links.images) == 3
    for src in links.images:  # every picture the page shows is there, and is a PNG
        assert (tmp_path / "page" / src).read_bytes()[:4] == b"\x89PNG", src
    assert "&lt;better&gt; &amp; kept" in page and "<better>" not in page  # data is escaped
    assert 'class="better">0.3100' in page and 'class="worse">0.9000' in page  # against the parent
    assert "day2.jsonl" in page and page.count("<td>v000") == 2  # lineage: this version and its parent


def test_the_report_page_loads_in_a_real_browser_with_every_image_and_no_console_error(
        trained_bundle, synthetic_data, tmp_path):
    from tests.browser import chromium_path, open_page

    chromium, why = chromium_path()
    if chromium is None:
        pytest.skip(f"no headless browser: {why}")
    registry = Registry(str(tmp_path / "reg"))
    second = promoted_child(registry, trained_bundle, synthetic_data, "promoted: bleu4 0.3100 vs 0.3000")
    page = main_report(registry, second, tmp_path / "page")
    shot = tmp_path / "report.png"
    seen = open_page(chromium, page.as_uri(), shot)
    assert seen.title.startswith(second) and seen.errors == [], seen.errors
    assert len(seen.images) == 1 + 4 and all(w > 0 and h > 0 for _, w, h in seen.images), seen.images
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    (page.parent / "index.html").write_text(page.read_text().replace("curves.png", "missing.png"))
    broken = open_page(chromium, page.as_uri(), tmp_path / "broken.png")  # the check can fail: a missing picture
    assert any(w == 0 for _, w, _ in broken.images) and any("missing.png" in e for e in broken.errors)


def main_report(registry: Registry, version: str, folder: Path) -> Path:
    code = main(["models", "show", version, "--registry", registry.uri, "--html", str(folder), "--gallery", "4"])
    assert code == 0
    return folder / "index.html"


def test_a_move_whose_event_was_lost_in_a_crash_is_recovered_and_previous_is_the_pointer_replaced(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    first = add_bundle(registry, str(fake_bundle(tmp_path / "a", "a")), {}, verify=no_check)
    second = add_bundle(registry, str(fake_bundle(tmp_path / "b", "b")), {}, verify=no_check)
    assert registry.move(first, None, "first", "promote", verify=no_check)
    pointer, tag = registry.current()
    assert registry.move(second, tag, "second", "promote", verify=no_check)
    (tmp_path / "reg" / "history" / "000002.json").unlink()  # the run crashed between its move and its event
    pointer, tag = registry.current()
    assert registry.move(first, tag, "back", "promote", verify=no_check)
    events = [(e["version"], e.get("previous"), bool(e.get("recovered"))) for e in registry.history()]
    assert events == [(first, None, False), (second, first, True), (first, second, False)]
    # A move with a tag read before someone else moved the pointer changes nothing.
    assert not registry.move(second, tag, "stale", "promote", verify=no_check)
    assert len(registry.history()) == 3
