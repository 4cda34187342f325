import json

import numpy as np
from PIL import Image

from captioning.datasets import synthetic
from captioning.manifest import read_manifest


def test_same_seed_same_bytes_and_captions(tmp_path):
    a = synthetic.generate(tmp_path / "a", {"train": 6}, seed=3, progress=False)["train"]
    b = synthetic.generate(tmp_path / "b", {"train": 6}, seed=3, progress=False)["train"]
    c = synthetic.generate(tmp_path / "c", {"train": 6}, seed=4, progress=False)["train"]
    assert a.read_text() == b.read_text() != c.read_text()
    for i in range(6):
        name = f"images/train/{i:06d}.jpg"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_captions_follow_from_pixels(synthetic_data):
    folder = synthetic_data["train"].parent
    rows = [json.loads(line) for line in synthetic_data["train"].read_text().splitlines()]
    assert {len(r["objects"]) for r in rows} == {1, 2, 3}
    for row in rows:
        pixels = np.asarray(Image.open(folder / row["image"]).convert("RGB")).astype(int)
        for obj in row["objects"]:
            # The centre pixel of every shape has (about) the colour its captions name.
            centre = pixels[obj["y"], obj["x"]]
            nearest = min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - centre).sum())
            assert nearest == obj["colour"]
            assert any(obj["colour"] in caption and obj["shape"] in caption for caption in row["caption"])
        objs = row["objects"]
        if row["arrangement"] == "horizontal":
            assert objs[0]["x"] < objs[1]["x"] and " left of " in row["caption"][0]
        if row["arrangement"] == "vertical":
            assert objs[0]["y"] < objs[1]["y"] and " above " in row["caption"][0]
        if row["arrangement"] == "row":
            assert objs[0]["x"] < objs[1]["x"] < objs[2]["x"]
            shapes = {o["shape"] for o in objs}
            count = f"three {objs[0]['shape']}s" if len(shapes) == 1 else "three shapes"
            assert any(c.startswith(count + " ") for c in row["caption"]), (count, row["caption"])
            # The left-to-right caption names the shapes in the order their pixels stand.
            left_to_right = next(c for c in row["caption"] if c.endswith("from left to right"))
            place = -1
            for obj in objs:  # each named after the previous one (the same shape may appear twice)
                place = left_to_right.index(f"{obj['colour']} {obj['shape']}", place + 1)


def test_manifest_has_several_captions_per_image(synthetic_data):
    manifest = read_manifest(synthetic_data["val"])
    assert len(manifest.examples) == 40 and not manifest.errors
    assert all(len(ex.captions) == 4 for ex in manifest.examples)
    assert len(manifest.pairs()) == 160
