"""Deterministic synthetic captioned scenes: captions follow from the pixels, so quality is measurable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioning import console
from captioning.atomic import atomic_path

SIZE = 224
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
RADIUS = {"small": (13, 19), "large": (30, 40)}
SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class Shape:
    """One drawn object: what the captions talk about."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    radius: int


@dataclass(frozen=True)
class Scene:
    """Background tone, the arrangement of the objects, and the objects in reading order."""

    tone: str
    arrangement: str  # single, horizontal (left to right), vertical (top to bottom), row (three, left to right)
    objects: tuple[Shape, ...]


def make_scene(rng: np.random.Generator) -> Scene:
    """Random scene: one to three shapes in non-overlapping cells so relations are unambiguous."""
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    if count == 1:
        arrangement, cells = "single", [(0, SIZE, 0, SIZE)]
    elif count == 2 and rng.random() < 0.5:
        arrangement, cells = "horizontal", [(0, SIZE // 2, 0, SIZE), (SIZE // 2, SIZE, 0, SIZE)]
    elif count == 2:
        arrangement, cells = "vertical", [(0, SIZE, 0, SIZE // 2), (0, SIZE, SIZE // 2, SIZE)]
    else:
        third = SIZE // 3
        arrangement, cells = "row", [(0, third, 0, SIZE), (third, 2 * third, 0, SIZE), (2 * third, SIZE, 0, SIZE)]
    objects = []
    for x0, x1, y0, y1 in cells:
        size = str(rng.choice(list(RADIUS)))
        lo, hi = RADIUS[size]
        # Three shapes share the width: keep them small enough to stay inside their cell.
        radius = int(rng.integers(lo, hi + 1)) if count < 3 else int(rng.integers(lo, min(hi, 34) + 1))
        margin = radius + 3
        x = int(rng.integers(x0 + margin, max(x0 + margin + 1, x1 - margin)))
        y = int(rng.integers(y0 + margin, max(y0 + margin + 1, y1 - margin)))
        objects.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size, x, y, radius))
    return Scene(str(rng.choice(["light", "dark"])), arrangement, tuple(objects))


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw the scene on a textured background of the scene's tone."""
    base = rng.integers(175, 235) if scene.tone == "light" else rng.integers(15, 75)
    tint = rng.integers(-12, 13, size=3)
    gradient = np.linspace(-15, 15, SIZE)[None, :, None] * rng.choice([-1, 1])
    noise = rng.normal(0, 6, size=(SIZE, SIZE, 1))
    pixels = np.clip(base + tint[None, None, :] + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-15, 16, size=3)
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        _draw_shape(draw, obj, colour, float(rng.uniform(0, math.pi * 2)))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Shape, colour: tuple[int, ...], angle: float) -> None:
    x, y, r = obj.x, obj.y, obj.radius
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=colour)
    elif obj.shape == "triangle":
        points = [(x + r * math.sin(a), y - r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(points, fill=colour)
    else:  # star: five points, a little rotation so it is not one template
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = angle * 0.1 + k * math.pi / 5
            points.append((x + radius * math.sin(a), y - radius * math.cos(a)))
        draw.polygon(points, fill=colour)


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def captions_for(scene: Scene) -> list[str]:
    """Several differently worded captions, each true of the pixels."""
    full = [_article(f"{o.size} {o.colour} {o.shape}") for o in scene.objects]
    plain = [_article(f"{o.colour} {o.shape}") for o in scene.objects]
    objs = scene.objects
    if scene.arrangement == "single":
        return [full[0], f"{full[0]} on a {scene.tone} background", f"there is {full[0]}", f"one {objs[0].colour} {objs[0].shape}"]
    if scene.arrangement in ("horizontal", "vertical"):
        before, after = ("left of", "right of") if scene.arrangement == "horizontal" else ("above", "below")
        same = objs[0].shape == objs[1].shape and objs[0].colour == objs[1].colour
        count = f"two {objs[0].colour} {objs[0].shape}s" if same else f"two shapes {plain[0]} and {plain[1]}"
        return [f"{full[0]} {before} {full[1]}", f"{full[1]} {after} {full[0]}", f"{plain[0]} and {plain[1]}", count]
    same_shape = len({o.shape for o in objs}) == 1
    count = f"three {objs[0].shape}s" if same_shape else "three shapes"
    return [
        f"{plain[0]} {plain[1]} and {plain[2]} from left to right",
        f"{count} {full[0]} {full[1]} and {full[2]}",
        f"{plain[1]} between {plain[0]} and {plain[2]}",
        f"{plain[0]} left of {plain[1]} and {plain[2]}",
    ]


def generate(out: str | Path, splits: dict[str, int], seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Write images/<split>/NNNNNN.jpg and <split>.jsonl for each split; returns the manifest paths."""
    out = Path(out)
    manifests = {}
    for split, count in splits.items():
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        path = out / f"{split}.jsonl"
        with atomic_path(path) as tmp, tmp.open("w") as handle:
            for i in console.progress(desc=f"synthetic {split}", unit="images", enabled=progress,
                                      iterable=range(count)):
                # One generator per image: image i is the same whatever the split size.
                rng = np.random.default_rng([seed, SPLIT_STREAMS.get(split, 9), i])
                scene = make_scene(rng)
                name = f"images/{split}/{i:06d}.jpg"
                render(scene, rng).save(out / name, quality=90)
                record = {"image": name, "caption": captions_for(scene), "tone": scene.tone,
                          "arrangement": scene.arrangement, "objects": [asdict(o) for o in scene.objects]}
                handle.write(json.dumps(record) + "\n")
        manifests[split] = path
    return manifests
