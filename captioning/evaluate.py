"""Corpus BLEU-1..4, CIDEr and (with Java) METEOR, using the COCO caption evaluation code."""

from __future__ import annotations

import shutil
from typing import Callable

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from captioning.bundle import Bundle
from captioning.config import ImageConfig
from captioning.errors import CaptioningError
from captioning.fetch import Fetcher
from captioning.config import GenerationConfig
from captioning.inference import caption_sources
from captioning.manifest import Manifest
from captioning.storage import Storage
from captioning.text import clean_text


def corpus_scores(references: dict[str, list[str]], hypotheses: dict[str, str], meteor: bool = True) -> dict:
    """Scores of one hypothesis per id against all its references, after the tokenizer's cleaning."""
    ids = [i for i in hypotheses if references.get(i)]
    if not ids:
        raise ValueError("nothing to score: no id has both a hypothesis and references")
    refs = {i: clean_text(references[i]) for i in ids}
    hyps = {i: [clean_text([hypotheses[i]])[0] or "<empty>"] for i in ids}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    scores: dict = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["cider"] = float(cider)
    scores["meteor"] = None
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415  (starts a JVM)

        scorer = Meteor()
        try:
            scores["meteor"] = float(scorer.compute_score(refs, hyps)[0])
        finally:
            scorer.meteor_p.kill()  # the wrapper has no close(); its JVM would otherwise live until GC
            scorer.meteor_p.wait()
    scores["images"] = len(ids)
    return scores


def evaluate(
    bundle: Bundle,
    manifest: Manifest,
    generation: GenerationConfig | None = None,
    image_config: ImageConfig | None = None,
    fetcher: Fetcher | None = None,
    batch_size: int | None = None,
    meteor: bool = True,
    log: Callable[[str], None] = print,
    storage: Storage | None = None,
    allow_empty: bool = False,
) -> dict:
    """Caption every manifest image and score against its references; failures are listed, not dropped.
    Nothing to score is an error naming the manifest, or with allow_empty scores of None."""
    generation = generation or GenerationConfig(attention=False)
    examples = [ex for ex in manifest.examples if ex.captions]
    results = caption_sources(bundle, [ex.image for ex in examples], generation, image_config, fetcher, batch_size,
                              storage=storage)
    rows, failures = [], []
    for ex, result in zip(examples, results):
        if result.error:
            log(f"skipped image {result.error}")
            failures.append({"id": ex.id, "image": ex.image, "error": str(result.error)})
        else:
            rows.append({"id": ex.id, "image": ex.image, "caption": result.caption, "references": list(ex.captions)})
    failures += [{"row": err.source, "error": str(err)} for err in manifest.errors]
    if not rows:
        if allow_empty:
            return {"model_version": bundle.version, "manifest": manifest.source, "method": generation.method,
                    "scores": None, "failures": failures, "captions": rows}
        first = f"; the first: {failures[0]['error']}" if failures else ""
        raise CaptioningError(manifest.source, f"nothing to score: none of its {len(examples)} captioned image(s) "
                              f"could be read ({len(failures)} failure(s){first})")
    scores = corpus_scores({r["id"]: r["references"] for r in rows}, {r["id"]: r["caption"] for r in rows}, meteor)
    scores["reference_oov"] = reference_oov([ref for r in rows for ref in r["references"]],
                                            bundle.model.tokenizer.vocabulary)
    return {"model_version": bundle.version, "manifest": manifest.source, "method": generation.method,
            "scores": scores, "failures": failures, "captions": rows}


def reference_oov(references: list[str], vocabulary: list[str]) -> float:
    """Share of reference words outside the model's vocabulary: scores count them as misses (the model never
    writes [UNK]), so this is the part of the references no caption of this model can match."""
    known = set(vocabulary)
    words = [word for text in clean_text(references) for word in text.split()] if references else []
    return sum(word not in known for word in words) / max(len(words), 1)


def format_scores(scores: dict) -> str:
    """One line of the headline scores."""
    parts = [f"{name.upper()} {scores[name]:.3f}" for name in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")]
    parts.append(f"METEOR {scores['meteor']:.3f}" if scores.get("meteor") is not None else "METEOR n/a (no java)")
    tail = f"; {scores['reference_oov']:.1%} of reference words out of vocabulary" if "reference_oov" in scores else ""
    return f"{' | '.join(parts)} on {scores['images']} images{tail}"
