"""A static HTML page about one registry version: its lineage, holdout scores against its parent, training
curves, and a gallery of holdout images with the caption, the reference captions and the attention per word.

    OUT/index.html  OUT/curves.png  OUT/gallery/NNN.png
Every value that comes from data (captions, paths, reasons) is HTML-escaped.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from captioning.atomic import atomic_path, atomic_write
from captioning.errors import CaptioningError
from captioning.registry import Registry

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")
STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#222}
table{border-collapse:collapse}td,th{padding:.3rem .7rem;border-bottom:1px solid #ddd;text-align:left}
.better{color:#176b2c}.worse{color:#a31515}figure{margin:0 0 2rem}figure img{max-width:100%}
.refs{color:#555;font-size:.9rem}"""


def lineage(registry: Registry, version: str) -> list[dict[str, Any]]:
    """The version and its ancestors, newest first."""
    chain, seen = [], set()
    while version and version not in seen:
        seen.add(version)
        info = registry.info(version)
        chain.append(info)
        version = info.get("parent")  # checked by the version schema: a version name or null
    return chain


def _scores_table(scores: dict[str, float] | None, parent: dict[str, float] | None) -> str:
    if not scores:
        return "<p>No holdout scores recorded for this version.</p>"
    rows = []
    for metric in METRICS:
        if metric not in scores:
            continue
        mine, theirs = scores[metric], (parent or {}).get(metric)
        mark = "" if theirs is None else (' class="better"' if mine >= theirs else ' class="worse"')
        rows.append(f"<tr><td>{metric.upper()}</td><td{mark}>{mine:.4f}</td>"
                    f"<td>{'-' if theirs is None else f'{theirs:.4f}'}</td></tr>")
    return "<table><tr><th>metric</th><th>this version</th><th>parent</th></tr>" + "".join(rows) + "</table>"


def write_report(registry: Registry, version: str, out: str | Path, gallery: int = 12) -> Path:
    """Write OUT/index.html (and its pictures) for a version; returns the page's path."""
    out = Path(out)
    for folder in (out, out / "gallery"):  # before TensorFlow loads: a wrong FOLDER is refused at once
        if folder.exists() and not folder.is_dir():
            raise CaptioningError(str(folder), "is a file, not a folder: choose a folder for the report")
    from captioning.bundle import load_bundle  # noqa: PLC0415  (TensorFlow: only for the gallery)
    from captioning.config import GenerationConfig, ImageConfig  # noqa: PLC0415
    from captioning.inference import caption_sources  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415
    from captioning.plots import plot_attention  # noqa: PLC0415

    try:
        (out / "gallery").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaptioningError(str(out), f"cannot create the report folder: {err.strerror or err}") from None
    storage = registry.storage
    chain = lineage(registry, version)
    info = chain[0]
    holdout = info.get("holdout") or {}
    bundle_uri = registry.bundle_uri(version)
    curves = f"{bundle_uri}/training_curves.png"
    has_curves = storage.exists(curves)
    if has_curves:
        with atomic_path(out / "curves.png") as tmp:  # a link at the target is replaced, never written through
            shutil.copyfile(storage.local_file(curves), tmp)

    figures = []
    if holdout.get("manifest") and gallery:
        bundle = load_bundle(bundle_uri, storage=storage)
        examples = read_manifest(holdout["manifest"], storage=storage).examples[:gallery]
        results = caption_sources(bundle, [ex.image for ex in examples], GenerationConfig(attention=True),
                                  ImageConfig(), keep_images=True, storage=storage)
        for index, (example, result) in enumerate(zip(examples, results)):
            refs = "".join(f"<li>{html.escape(c)}</li>" for c in example.captions)
            if result.error:
                figures.append(f"<figure><figcaption>{html.escape(example.image)}: "
                               f"{html.escape(str(result.error))}</figcaption></figure>")
                continue
            name = f"gallery/{index:03d}.png"
            plot_attention(result.image, result.caption.split(), result.attention, out / name, result.caption)
            figures.append(f'<figure><img src="{name}" alt="attention per word for {html.escape(result.caption)}">'
                           f"<figcaption><b>{html.escape(result.caption)}</b><ul class=\"refs\">{refs}</ul>"
                           "</figcaption></figure>")

    rows = "".join(
        f"<tr><td>{html.escape(v['version'])}</td><td>{html.escape(str(v.get('created', '')))}</td>"
        f"<td>{html.escape(str(v.get('decision', '')))}</td>"
        f"<td>{html.escape(', '.join(m['uri'].rsplit('/', 1)[-1] for m in v.get('manifests', [])))}</td></tr>"
        for v in chain)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(version)} - captioning model report</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(version)}</h1>
<p>Registry {html.escape(registry.uri)}. {html.escape(str(info.get('decision', '')))}</p>
<h2>Lineage</h2>
<table><tr><th>version</th><th>created</th><th>decision</th><th>trained on</th></tr>{rows}</table>
<h2>Holdout scores</h2>
<p>{html.escape(str(holdout.get('manifest', 'no holdout recorded')))}</p>
{_scores_table(holdout.get('scores'), holdout.get('parent_scores'))}
<h2>Training curves</h2>
{'<img src="curves.png" alt="training curves">' if has_curves else '<p>No training curves in this bundle.</p>'}
<h2>Holdout gallery</h2>
{''.join(figures) or '<p>No holdout images to show.</p>'}
</body></html>
"""
    atomic_write(out / "index.html", page.encode())
    return out / "index.html"
