"""make eval, open vocabulary on real photos: label queries per mode, and a head trained on real photos.

- `open_vocabulary`: the artifact's head (trained on its own folder, CIFAR-10 by default), every photo
  of the open-vocabulary folder (`../shared/data/imagenet200` by default) indexed, its category names
  as queries; P@5 and mAP per mode for the test half, the validation half and all categories.
- `real_zero_shot`: a head trained on the validation half's photos (their category names as labels,
  4 photos each, the fifth for its validation), every photo indexed; P@5 and mAP for queries of the
  test half (never trained on) and of the validation half (trained on), per mode. ConSE's parameters
  are the artifact's; the gate is chosen again for this head, inside the validation half (a head
  trained on half of its categories, the other half as the words never trained on).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from batch import open_vocab, quality
from batch.open_vocab import Expand, OpenSet, broad_precision, broad_words, label_query, retrieval, split_labels
from batch.wordnet import WordNet
from batch.train_head import HeadConfig, split, train_head
from services.encoder.modes import MODES, Familiarity, Modes

log = logging.getLogger(__name__)

ZERO_SHOT_VAL_FRACTION = 0.2  # of 5 photos per category: 4 train the head, 1 validates it


def _halves(vectors: np.ndarray, photos: OpenSet, rows: dict[str, int], word_vectors: np.ndarray,
            expand: Expand | None, broad: dict[str, dict[str, list[str]]] | None = None) -> dict:
    validation, test = split_labels(set(photos.truth.tolist()))
    out = {}
    for half, queries in (("test", test), ("validation", validation), ("all", validation + test)):
        result = retrieval(vectors, photos.truth, queries, rows, word_vectors, expand)
        out[half] = {"p5": result["p5"], "map": result["map"], "queries": result["queries"],
                     "not_asked": result["not_asked"]}
        if broad and broad.get(half):
            words = broad_precision(vectors, photos.truth, broad[half], rows, word_vectors, expand=expand)
            out[half].update(broad_p10=words["p10"], broad_queries=words["queries"])
    return out


def broad_queries(photos: OpenSet, names: WordNet, rows: dict[str, int]) -> dict[str, dict[str, list[str]]]:
    """Per half: its broad words (from its own categories), each relevant to every category below it."""
    categories = sorted(set(photos.truth.tolist()))
    below = broad_words(photos.synsets, categories, names, rows, min_categories=1, max_share=1.0)
    validation, test = split_labels(categories)
    return {half: {word: below[word] for word in broad_words(photos.synsets, cats, names, rows)}
            for half, cats in (("test", test), ("validation", validation), ("all", categories))}


def open_vocabulary(modes: Modes, photos: OpenSet, rows: dict[str, int], word_vectors: np.ndarray,
                    broad: dict[str, dict[str, list[str]]] | None = None) -> dict:
    by_mode = {mode: _halves(modes.embed(photos.features, mode), photos, rows, word_vectors, modes.expand, broad)
               for mode in MODES}
    return {"photos": int(len(photos.truth)), "categories": int(len(set(photos.truth.tolist()))),
            "modes": by_mode, "default": modes.params.default, "random_p5": 5 / len(photos.truth),
            "broad_words": broad or {}}


def _train_real_head(photos: OpenSet, labels: list[str], rows: dict[str, int], word_vectors: np.ndarray,
                     config: HeadConfig, storage: Path, modes: Modes) -> tuple[Modes, int, int]:
    """A head trained on the photos of `labels` (4 of each category's 5; the fifth validates it), as Modes."""
    targets = np.stack([label_query(label, rows, word_vectors) for label in labels])
    chosen = np.flatnonzero(np.isin(photos.truth, labels))
    label_ids = np.asarray([labels.index(label) for label in photos.truth[chosen]])
    train_rows, val_rows = split(label_ids, ZERO_SHOT_VAL_FRACTION, config.seed)
    features = photos.features[chosen]
    log.info("real-photo zero-shot: training a head on %d photos of %d categories", len(train_rows), len(labels))
    trained = train_head(features, label_ids, targets, train_rows, val_rows, config, storage)
    familiarity = Familiarity.fit(features[train_rows], label_ids[train_rows], features[val_rows])
    return modes.with_head(trained.head, targets, familiarity), len(train_rows), len(val_rows)


def _choose_gate(photos: OpenSet, validation: list[str], rows: dict[str, int], word_vectors: np.ndarray,
                 config: HeadConfig, storage: Path, modes: Modes) -> dict:
    """The gate for a head trained on real photos, chosen inside the validation half: a head trained on
    half of its categories; the best mAP for the other half (never trained on) among the gates that keep
    the trained half's mAP within TOLERANCE of devise's. No test-half photo is looked at."""
    trained, unseen = validation[0::2], validation[1::2]
    inner, _, _ = _train_real_head(photos, trained, rows, word_vectors, config, storage, modes)
    keep = np.isin(photos.truth, validation)
    features, truth = photos.features[keep], photos.truth[keep]
    hybrid, conse = inner.embed(features, "hybrid"), inner.conse(features)
    floor = retrieval(inner.embed(features, "devise"), truth, trained, rows, word_vectors,
                      inner.expand)["map"] - quality.TOLERANCE
    best, scores = None, {}
    for center in quality.GATE_CENTERS:
        for width in quality.GATE_WIDTHS:
            vectors = inner.gated(features, hybrid, conse, center, width)
            seen = retrieval(vectors, truth, trained, rows, word_vectors, inner.expand)["map"]
            new = retrieval(vectors, truth, unseen, rows, word_vectors, inner.expand)["map"]
            scores[f"{center}/{width}"] = {"trained_map": seen, "unseen_map": new}
            if seen >= floor and (best is None or new > best[0] + 1e-9):
                best = (new, center, width)
    if best is None:  # no gate keeps the trained categories: the one that leaves the most to the head
        center, width = min(quality.GATE_CENTERS), min(quality.GATE_WIDTHS)
        best = (scores[f"{center}/{width}"]["unseen_map"], center, width)
    return {"center": best[1], "width": best[2], "validation_unseen_map": best[0], "scores": scores,
            "rule": "inside the validation half: best mAP of categories never trained on, keeping the trained "
                    f"categories' mAP within {quality.TOLERANCE} of devise's"}


def real_zero_shot(modes: Modes, photos: OpenSet, rows: dict[str, int], word_vectors: np.ndarray,
                   config: HeadConfig, storage: Path) -> dict:
    validation, _ = split_labels(set(photos.truth.tolist()))
    labels = [label for label in validation if label_query(label, rows, word_vectors) is not None]
    gate = _choose_gate(photos, labels, rows, word_vectors, config, storage, modes)
    real, trained_on, validated_on = _train_real_head(photos, labels, rows, word_vectors, config, storage, modes)
    real = real.with_params(gate_center=gate["center"], gate_width=gate["width"])
    by_mode = {}
    for mode in MODES:
        halves = _halves(real.embed(photos.features, mode), photos, rows, word_vectors, real.expand)
        by_mode[mode] = {"unseen": halves["test"], "seen": halves["validation"]}
    return {"labels": len(labels), "trained_on": trained_on, "head_validation": validated_on, "gate": gate,
            "modes": by_mode, "default": modes.params.default}


def galleries(out: Path, modes: Modes, photos: OpenSet, rows: dict[str, int], word_vectors: np.ndarray) -> str:
    vectors = {mode: modes.embed(photos.features, mode) for mode in MODES}
    path = quality.gallery(out / "gallery-real-photos.html", vectors, photos.paths, photos.ids,
                           photos.truth.tolist(), rows, word_vectors, quality.OPEN_GALLERY_QUERIES,
                           title=f"{len(photos.truth)} real photos", relevance=False, expand=modes.expand)
    return str(path)


def markdown(block: dict, zero_shot: dict | None) -> str:
    f = lambda x: f"{x:.3f}"  # noqa: E731
    lines = ["", f"Open vocabulary on {block['photos']} real photos ({block['categories']} categories; "
                 f"head trained on the artifact's folder; category names as queries; default mode "
                 f"{block['default']}; random P@5 {block['random_p5']:.3f}):", "",
             "| mode | test half P@5 | test half mAP | test half broad P@10 | validation half P@5 | "
             "validation half mAP | validation half broad P@10 | all P@5 | all mAP | all broad P@10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, halves in block["modes"].items():
        name = f"{mode} (default)" if mode == block["default"] else mode
        lines.append(f"| {name} | " + " | ".join(f(halves[h][m]) if m in halves[h] else "-"
                                                 for h in ("test", "validation", "all")
                                                 for m in ("p5", "map", "broad_p10")) + " |")
    broad = block.get("broad_words") or {}
    if broad.get("test"):
        lines += ["", f"Broad words of the test half ({len(broad['test'])}): " + ", ".join(sorted(broad["test"]))]
    if zero_shot:
        gate = zero_shot["gate"]
        lines += ["", f"Real-photo zero-shot: a head trained on {zero_shot['trained_on']} photos of the "
                      f"{zero_shot['labels']} validation-half categories, all photos indexed; gate center "
                      f"{gate['center']}, width {gate['width']} ({gate['rule']}):", "",
                  "| mode | unseen (test half) P@5 | unseen mAP | seen (validation half) P@5 | seen mAP |",
                  "|---|---|---|---|---|"]
        for mode, row in zero_shot["modes"].items():
            name = f"{mode} (default)" if mode == zero_shot["default"] else mode
            lines.append(f"| {name} | {f(row['unseen']['p5'])} | {f(row['unseen']['map'])} | "
                         f"{f(row['seen']['p5'])} | {f(row['seen']['map'])} |")
    return "\n".join(lines) + "\n"


def photos_of(folder: str | Path, features_of) -> OpenSet | None:
    """The folder's labelled photos with features from `features_of(records) -> (ok records, features, _)`."""
    ok, features, _ = features_of(open_vocab.records(folder))
    return open_vocab.open_set(ok, dict(zip([r.path for r in ok], features))) if ok else None
