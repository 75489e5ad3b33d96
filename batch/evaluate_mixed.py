"""make eval, mixed queries and explanations on real photos.

Mixed queries: does a photo and a word find more than either alone?

For each category L of the open-vocabulary folder (`../shared/data/imagenet200`), its first photo (by
id) is the query photo and L's other photos are the relevant ones, ranked among all the folder's
photos but the query photo, in the artifact's default mode (the mode of the image index). Three
queries per category, each made as the gateway makes it (services/common/mixing.py):

- `photo`: the photo alone (SimilarImages);
- `word`: L's name as a text query (batch/open_vocab.py's `label_query`);
- `mixed`: `img:<photo> + L`: unit(w * photo + the name's word terms), with the image weight w.

w is chosen on the validation half of the fixed category split: the largest of IMAGE_WEIGHTS whose mixed
mAP is within CLOSE of the best. Here the word names the category sought, so this benchmark favours the
word; among weights it cannot tell apart, the one that gives the photo the most say is taken. The test
half is only reported: at that w, at the product's default image weight (DEFAULT_IMAGE_WEIGHT, chosen
this way on the default artifact) and at 1, a word's weight.

Explanations' classes: an explanation names the ImageNet classes whose class vectors lie nearest the
photo's vector (Modes.nearest_classes), read from the stored vector alone. `class_agreement` says how
often they are the classes the backbone's classifier itself ranks first for the photo.
"""

from __future__ import annotations

import re

import numpy as np

from batch.open_vocab import Expand, OpenSet, split_labels
from services.encoder.modes import Modes
from services.common.image_terms import DEFAULT_IMAGE_WEIGHT
from services.common.mixing import WeightedVector, combine
from services.encoder.query import Term, term_vectors

IMAGE_WEIGHTS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)
KINDS = ("photo", "word", "mixed")
CLOSE = 0.005  # validation mAPs this close to the best count as equal


def name_terms(label: str, rows: dict[str, int], vectors: np.ndarray, expand: Expand | None) -> list[WeightedVector]:
    """A category name's words as query terms (`_`, `-` read as spaces, `or` dropped, unknown words dropped)."""
    words = [w for w in re.split(r"[_\-\s]+", label.lower()) if w and w != "or" and w in rows]
    return [WeightedVector(t.term, t.weight, t.vector)
            for t in term_vectors([Term(w, 1.0) for w in words], rows, vectors, expand)]


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    ranks = np.flatnonzero(relevant[np.argsort(-scores, kind="stable")])
    return float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1))) if len(ranks) else 0.0


def _queries(label: str, photo: int, vectors: np.ndarray, rows: dict[str, int], word_vectors: np.ndarray,
             expand: Expand | None, weight: float) -> dict[str, np.ndarray] | None:
    words = name_terms(label, rows, word_vectors, expand)
    if not words:
        return None
    image = WeightedVector(f"img:{photo}", weight, vectors[photo])
    return {"photo": vectors[photo], "word": combine(words).vector, "mixed": combine([*words, image]).vector}


def category_aps(vectors: np.ndarray, photos: OpenSet, labels: list[str], rows: dict[str, int],
                 word_vectors: np.ndarray, expand: Expand | None, weight: float) -> dict[str, dict[str, float]]:
    """Category -> the AP of each kind of query, its first photo as the query photo."""
    out = {}
    for label in labels:
        members = sorted(np.flatnonzero(photos.truth == label), key=lambda row: photos.ids[row])
        if len(members) < 2:
            continue
        photo = members[0]
        queries = _queries(label, photo, vectors, rows, word_vectors, expand, weight)
        if queries is None:
            continue
        others = np.ones(len(vectors), bool)
        others[photo] = False
        relevant = photos.truth[others] == label
        out[label] = {kind: average_precision(vectors[others] @ query, relevant) for kind, query in queries.items()}
    return out


def _means(aps: dict[str, dict[str, float]]) -> dict:
    return {"queries": len(aps), **{kind: float(np.mean([ap[kind] for ap in aps.values()])) if aps else 0.0
                                    for kind in KINDS}}


def mixed_queries(vectors: np.ndarray, photos: OpenSet, rows: dict[str, int], word_vectors: np.ndarray,
                  expand: Expand | None, mode: str) -> dict:
    """mAP of photo, word and mixed queries per half; the image weight chosen on the validation half."""
    validation, test = split_labels(set(photos.truth.tolist()))
    on_validation = {weight: _means(category_aps(vectors, photos, validation, rows, word_vectors, expand, weight))
                     for weight in IMAGE_WEIGHTS}
    best = max(on_validation[weight]["mixed"] for weight in IMAGE_WEIGHTS)
    chosen = max(weight for weight in IMAGE_WEIGHTS if on_validation[weight]["mixed"] >= best - CLOSE)
    halves = {}
    for half, labels in (("validation", validation), ("test", test)):
        halves[half] = {f"weight {weight:g}": _means(category_aps(vectors, photos, labels, rows, word_vectors,
                                                                  expand, weight))
                        for weight in sorted({chosen, DEFAULT_IMAGE_WEIGHT, 1.0})}
    return {"mode": mode, "chosen_weight": chosen, "default_weight": DEFAULT_IMAGE_WEIGHT, "halves": halves,
            "validation_by_weight": {f"{w:g}": on_validation[w]["mixed"] for w in IMAGE_WEIGHTS},
            "rule": f"the largest image weight whose validation-half mixed mAP is within {CLOSE} of the best, among "
                    + ", ".join(f"{w:g}" for w in IMAGE_WEIGHTS)}


def class_agreement(modes: Modes, features: np.ndarray, mode_names: tuple[str, ...] = ("conse", "hybrid", "gated"),
                    k: int = 3) -> dict:
    """Per mode: how often the class nearest each photo's vector is the classifier's top class, how often
    it is among the classifier's top k, and the mean overlap of the two top-k lists."""
    by_classifier = np.argsort(-modes.probabilities(features), axis=1)[:, :k]
    out = {}
    for mode in mode_names:
        vectors = modes.embed(features, mode)
        nearest = np.argsort(-(vectors @ modes.table.T), axis=1, kind="stable")[:, :k]
        overlap = [len(set(a) & set(b)) / k for a, b in zip(nearest.tolist(), by_classifier.tolist())]
        out[mode] = {"top1_is_classifier_top1": float(np.mean(nearest[:, 0] == by_classifier[:, 0])),
                     f"top1_in_classifier_top{k}": float(np.mean([a in b for a, b in zip(nearest[:, 0], by_classifier)])),
                     f"top{k}_overlap": float(np.mean(overlap))}
    return {"photos": int(len(features)), "k": k, "modes": out}


def markdown(block: dict) -> str:
    f = lambda x: f"{x:.3f}"  # noqa: E731
    lines = ["", f"Mixed queries on the real photos (`img:<first photo of L> + L`, L's other photos relevant, "
                 f"ranked among all but the query photo; {block['mode']} mode; image weight "
                 f"{block['chosen_weight']:g} chosen on the validation half ({block['rule']}); the default weight of "
                 f"an image term is {block['default_weight']:g}):", "",
             "| half | image weight | categories | photo alone mAP | word alone mAP | photo + word mAP |",
             "|---|---|---|---|---|---|"]
    for half, by_weight in block["halves"].items():
        for weight, row in by_weight.items():
            lines.append(f"| {half} | {weight.split()[1]} | {row['queries']} | {f(row['photo'])} | {f(row['word'])} | "
                         f"{f(row['mixed'])} |")
    agreement = block.get("classes")
    if agreement:
        k = agreement["k"]
        lines += ["", f"Explanations' ImageNet classes (the {k} nearest the photo's vector) against the classifier's "
                      f"own top {k}, on the {agreement['photos']} photos:", "",
                  f"| mode | nearest = classifier top 1 | nearest in classifier top {k} | top {k} overlap |",
                  "|---|---|---|---|"]
        for mode, row in agreement["modes"].items():
            lines.append(f"| {mode} | {f(row['top1_is_classifier_top1'])} | {f(row[f'top1_in_classifier_top{k}'])} | "
                         f"{f(row[f'top{k}_overlap'])} |")
    return "\n".join(lines) + "\n"
