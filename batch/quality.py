"""Search quality: mode parameters chosen on validation, and the evaluation report.

One report, two callers: batch-train writes it on its validation split into every artifact,
`make eval` (batch/evaluate.py) on a labelled test folder. It holds
- flat hit@1/2/5 over the label set per mode, beside a softmax classifier trained on the same features;
- tag hit@1/5/10 over the whole vocabulary per mode;
- zero-shot: a head trained without the held-out labels (default cat, truck); hit@1 among all
  labels and among the unseen ones, for unseen and for seen photos, per mode;
- a concept benchmark (words that are not labels, each with the labels of its relevant photos):
  precision@10 of text -> image search per mode;
- the example queries with their top answers.

Mode parameters are never chosen on the evaluated split: batch-train chooses them on the
validation split of the training folder (`choose`), and `make eval` reads them from the artifact.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from batch.class_table import PLAIN, Enrichment
from batch.open_vocab import Expand, OpenQueries, OpenSet
from services.encoder.head import Head
from services.encoder.modes import MODES, Modes, QueryExpansion
from services.encoder.query import Term, embed

log = logging.getLogger(__name__)

DEFAULT_HELD_OUT = ("cat", "truck")
BASELINES = "baselines"  # artifact folder of the extra heads
SOFTMAX_HEAD = "softmax.npz"
ZERO_SHOT_HEAD = "zero_shot.npz"
REPORT_MD = "report.md"
TOPS = (1, 5, 10, 20)
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
GAMMAS = tuple(round(g, 3) for g in np.arange(0, 0.4, 0.005))
TOLERANCE = 0.005  # hybrid may lose at most this much of devise's validation tag hit@1
SEEN_KEEP = 0.85  # zero-shot calibration keeps at least this share of devise's seen-photo hit@1
# ConSE's class vectors: WordNet synonyms and hypernyms at these weights (batch/class_table.py)
ENRICHMENTS = tuple(Enrichment(s, h, d) for s in (0.5, 1.0) for h in (0.0, 0.5, 1.0, 1.5)
                    for d in (0.3, 0.6, 0.8) if h > 0 or d == 0.3)
GATE_CENTERS = (2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0)  # gated: z of half head, half ConSE
GATE_WIDTHS = (0.5, 1.0, 2.0)
EXPANSIONS = (0.0, 0.5, 1.0, 2.0, 4.0)  # weight of a text query word's WordNet expansion (QueryExpansion)
MakeTable = Callable[[Enrichment], tuple[np.ndarray, QueryExpansion]]  # class vectors and their query expansion
OPEN_SCORE = ("open-vocabulary score (the mean of category-name mAP and broad-word P@10 on the validation "
              "half's photos; the mAP alone where no broad words are known)")

# Concept benchmark: query words that are not labels -> the labels whose photos are relevant.
CONCEPTS: dict[str, tuple[str, ...]] = {
    "kitten": ("cat",), "feline": ("cat",), "puppy": ("dog",), "jet": ("airplane",),
    "boat": ("ship",), "sailing": ("ship",), "ocean": ("ship",), "lorry": ("truck",),
    "highway": ("automobile", "truck"), "vehicle": ("automobile", "truck"), "stallion": ("horse",),
    "toad": ("frog",), "antlers": ("deer",), "sparrow": ("bird",), "wings": ("airplane", "bird"),
    "pet": ("cat", "dog"), "mammal": ("cat", "deer", "dog", "horse"),
    "animal": ("bird", "cat", "deer", "dog", "frog", "horse"),
}
EXAMPLES = ("dog", "ocean", "cat sofa", "cat+sofa-dog", "kitten", "lorry")
GALLERY_QUERIES = ("kitten", "ocean", "lorry", "antlers")
OPEN_GALLERY_QUERIES = ("ocean", "street", "cat sofa", "kitten", "vehicle")  # on real photos


@dataclass
class Extras:
    """Heads trained beside the default one, on the same training rows."""

    softmax: Head  # the baseline classifier over the labels (argmax of its outputs)
    zero_shot: Head  # the DeViSE head trained without the held-out labels
    held_out: list[str]


@dataclass(frozen=True)
class Vocabulary:
    """The whole word-vector vocabulary as the figures use it: the words, each word's row, the unit rows."""

    words: list[str]
    rows: dict[str, int]
    vectors: np.ndarray

    @classmethod
    def of(cls, word_vectors) -> Vocabulary:
        """From a services.encoder.word_vectors.WordVectors."""
        return cls(word_vectors.words, word_vectors.index(), word_vectors.vectors)


@dataclass(frozen=True)
class Photos:
    """Backbone features of labelled photos and their label ids (positions in the label list)."""

    features: np.ndarray
    truth: np.ndarray


def label_matrix(labels: list[str], rows: dict[str, int], vectors: np.ndarray,
                 source: str = "the vocabulary") -> np.ndarray:
    """Each label's unit vector: its word's, or the mean of its words' (`golden_retriever`).

    ValueError naming every label with a word that has no vector.
    """
    found, missing = [], []
    for label in labels:
        parts = [p for p in re.split(r"[_\s\-]+", label.lower()) if p]
        if not parts or any(part not in rows for part in parts):
            missing.append(label)
            continue
        found.append(embed([Term(part, 1.0) for part in parts], rows, vectors))
    if missing:
        raise ValueError(f"labels without a word vector in {source}: {', '.join(missing)} "
                         "(rename those folders to words of the vocabulary)")
    return np.stack(found)


def hits(scores: np.ndarray, truth: np.ndarray, ks=(1, 2, 5)) -> dict[str, float]:
    """Share of rows whose true column is among the top k scores."""
    order = np.argsort(-scores, axis=1)
    return {f"hit{k}": float(np.mean((order[:, :k] == truth[:, None]).any(axis=1))) for k in ks}


def tag_hits(vectors: np.ndarray, truth_words: list[str], rows: dict[str, int], word_vectors: np.ndarray,
             ks=(1, 5, 10)) -> dict[str, float]:
    """Tag hit@k: the true label word among the k nearest words of the whole vocabulary (exact).

    The rank of the true word is the number of words scoring above it (no full sort); for hit@1 alone,
    whether the best score is above it (a maximum costs about half as much as a count).
    """
    row_of = {word: rows.get(word, -1) for word in set(truth_words)}  # -1: not one word, never a hit
    ranks = np.full(len(vectors), np.iinfo(np.int64).max)
    for start in range(0, len(vectors), 256):
        chunk = vectors[start:start + 256]
        truth_rows = np.asarray([row_of[w] for w in truth_words[start:start + 256]])
        known = truth_rows >= 0
        if not known.any():
            continue
        scores = chunk[known] @ word_vectors.T
        truth_scores = scores[np.arange(len(scores)), truth_rows[known]]
        if max(ks) == 1:
            ranks[start + np.flatnonzero(known)] = scores.max(axis=1) > truth_scores
        else:
            ranks[start + np.flatnonzero(known)] = (scores > truth_scores[:, None]).sum(axis=1)
    return {f"tag_hit{k}": float(np.mean(ranks < k)) if len(ranks) else 0.0 for k in ks}


def held_out_labels(labels: list[str], requested: list[str] | None = None, seed: int = 0) -> list[str]:
    """The labels left out of the zero-shot head: `requested`, else cat+truck, else a seeded fifth."""
    if requested:
        missing = [label for label in requested if label not in labels]
        if missing:
            raise ValueError(f"held-out labels not among the labels: {', '.join(missing)}")
        return list(requested)
    if all(label in labels for label in DEFAULT_HELD_OUT):
        return list(DEFAULT_HELD_OUT)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(labels, size=max(1, len(labels) // 5), replace=False).tolist())


def extra_jobs(label_ids: np.ndarray, labels: list[str], targets: np.ndarray, train_rows: np.ndarray,
               val_rows: np.ndarray, config, held_out: list[str]) -> list:
    """The softmax baseline's and the zero-shot head's training jobs (same rows, same recipe).

    The zero-shot head sees neither the held-out labels' photos nor their words (not even as negatives).
    """
    from batch.train_head import HeadJob

    softmax = HeadJob(label_ids, np.eye(len(labels), dtype=np.float32), train_rows, val_rows,
                      type(config)(**{**config.__dict__, "loss": "softmax"}), "softmax baseline")
    seen = np.asarray([label not in held_out for label in labels])
    unseen = ~seen[label_ids]
    remap = np.cumsum(seen) - 1
    zero_shot = HeadJob(remap[label_ids], targets[seen], train_rows[~unseen[train_rows]],
                        val_rows[~unseen[val_rows]], config, "zero-shot head")
    return [softmax, zero_shot]


def train_extras(features: np.ndarray, label_ids: np.ndarray, labels: list[str], targets: np.ndarray,
                 train_rows: np.ndarray, val_rows: np.ndarray, config, storage: Path,
                 held_out: list[str]) -> Extras:
    """Train the softmax baseline and the zero-shot head with Ray Train, in one run."""
    from batch.train_head import train_heads

    softmax, zero_shot = train_heads(features, extra_jobs(label_ids, labels, targets, train_rows, val_rows, config,
                                                          held_out), storage)
    return Extras(softmax.head, zero_shot.head, list(held_out))


def zero_shot_scores(modes: Modes, features: np.ndarray, label_vectors: np.ndarray, seen: np.ndarray,
                     mode: str, beta: float, gamma: float) -> np.ndarray:
    vectors = modes.embed(features, mode, beta=beta)
    return modes.label_scores(vectors, label_vectors, seen, gamma)


def _split_hit1(scores: np.ndarray, truth: np.ndarray, seen: np.ndarray) -> tuple[float, float]:
    """hit@1 among all labels for (unseen photos, seen photos)."""
    predicted = scores.argmax(axis=1)
    unseen_photo = ~seen[truth]
    return (float(np.mean(predicted[unseen_photo] == truth[unseen_photo])) if unseen_photo.any() else 0.0,
            float(np.mean(predicted[~unseen_photo] == truth[~unseen_photo])) if (~unseen_photo).any() else 0.0)


def zero_shot_rows(label_ids: np.ndarray, val_rows: np.ndarray, labels: list[str], held_out: list[str]) -> np.ndarray:
    """Validation rows for the zero-shot parameters: the seen labels' validation photos and every photo
    of the held-out labels (the zero-shot head never trains on any of them)."""
    unseen = np.isin(label_ids, [labels.index(label) for label in held_out])
    return np.union1d(val_rows[~unseen[val_rows]], np.flatnonzero(unseen))


def choose(modes: Modes, labels: list[str], vocabulary: Vocabulary, validation: Photos,
           extras: Extras | None = None, zero_shot: Photos | None = None, open_set: OpenSet | None = None,
           make_table: MakeTable | None = None) -> tuple[Modes, dict]:
    """Mode parameters from validation figures, never from a test split.

    `validation`: the training folder's validation split (trained labels). `zero_shot`: the photos the
    zero-shot parameters are chosen on (zero_shot_rows; default `validation`). `open_set`: real
    photos of the validation half of an open-vocabulary folder (words never trained on), if any.

    - ConSE's class vectors (WordNet enrichment, `make_table`), T and the text queries' expansion
      weight: best OPEN_SCORE (without an open set: best flat hit@1 on the trained labels, no expansion).
    - hybrid beta: the largest whose tag hit@1 stays within TOLERANCE of devise's.
    - the gate's center and width: best OPEN_SCORE of `gated` among those keeping flat and
      tag hit@1 within TOLERANCE of devise's.
    - the default mode: best OPEN_SCORE among the modes that keep flat and tag hit@1 within
      TOLERANCE of devise's (without an open set: hybrid if beta > 0 and its concept precision is
      at least devise's, else devise).
    - zero-shot beta and gamma: see _choose_zero_shot.
    """
    label_vectors = label_matrix(labels, vocabulary.rows, vocabulary.vectors)
    trained = _TrainedLabels(validation.features, validation.truth, [labels[t].lower() for t in validation.truth],
                             label_vectors, vocabulary)
    figures: dict = {"images": int(len(validation.truth)), "open_vocabulary": _describe(open_set)}
    modes = _choose_conse(modes, trained, open_set, make_table, figures)
    modes = _choose_beta(modes, trained, figures)
    modes = _choose_gate(modes, trained, open_set, figures)
    default = _choose_default(modes, trained, open_set, labels, figures)
    zero_shot_figures, gamma = {}, 0.0
    if extras is not None:
        zero_shot = validation if zero_shot is None else zero_shot
        zero_shot_figures = _choose_zero_shot(modes, extras, labels, label_vectors, zero_shot.features, zero_shot.truth)
        gamma = zero_shot_figures["gamma"]
    chosen_on = {"split": "validation split of the training folder", **figures, "zero_shot": zero_shot_figures}
    modes = modes.with_params(default=default, gamma=gamma, chosen_on=chosen_on)
    return modes, modes.params.to_dict()


@dataclass
class _TrainedLabels:
    """The training folder's validation photos and what the trained-label figures need."""

    features: np.ndarray
    truth: np.ndarray
    truth_words: list[str]
    label_vectors: np.ndarray
    vocabulary: Vocabulary

    _tag_hit1: dict = field(default_factory=dict)  # by the vectors' digest: the mode choices ask again

    def figures(self, vectors: np.ndarray) -> tuple[float, float]:
        """(flat hit@1 over the labels, tag hit@1 over the whole vocabulary)."""
        return self.flat_hit1(vectors), self.tag_hit1(vectors)

    def flat_hit1(self, vectors: np.ndarray) -> float:
        return hits(vectors @ self.label_vectors.T, self.truth, (1,))["hit1"]

    def tag_hit1(self, vectors: np.ndarray) -> float:
        key = hashlib.blake2b(np.ascontiguousarray(vectors).tobytes(), digest_size=16).digest()
        if key not in self._tag_hit1:
            self._tag_hit1[key] = tag_hits(vectors, self.truth_words, self.vocabulary.rows, self.vocabulary.vectors,
                                           (1,))["tag_hit1"]
        return self._tag_hit1[key]

    def keeps(self, vectors: np.ndarray, devise: tuple[float, float]) -> bool:
        """Flat and tag hit@1 within TOLERANCE of devise's (the costly tag figure only when flat keeps)."""
        return (self.flat_hit1(vectors) >= devise[0] - TOLERANCE
                and self.tag_hit1(vectors) >= devise[1] - TOLERANCE)


def _describe(open_set: OpenSet | None) -> dict:
    if open_set is None:
        return {}
    return {"photos": int(len(open_set.truth)), "categories": sorted(set(open_set.truth.tolist())),
            "broad_words": open_set.broad,
            "split": "validation half of the open-vocabulary folder's categories (batch/open_vocab.py)"}


def _open_score(vectors: np.ndarray, open_set: OpenSet, vocabulary: Vocabulary, queries: OpenQueries) -> float:
    return open_set.score(vectors, vocabulary.rows, vocabulary.vectors, queries=queries)["score"]


def _choose_conse(modes: Modes, trained: _TrainedLabels, open_set: OpenSet | None,
                  make_table: MakeTable | None, figures: dict) -> Modes:
    """ConSE's class vectors, T and the text queries' expansion weight."""
    candidates = (ENRICHMENTS if open_set is not None else (PLAIN, Enrichment())) if make_table else (None,)
    best, scores = None, {}
    photos = open_set.features if open_set is not None else trained.features
    probabilities = modes.probabilities(photos)  # the classifier is the same for every candidate table
    for enrichment in candidates:
        candidate = modes.with_table(*make_table(enrichment)) if enrichment is not None else modes
        queries: dict[float, OpenQueries] = {}  # by expansion weight: the same for every T
        for top in TOPS:
            vectors = candidate.conse(photos, top, probabilities)
            for weight in (EXPANSIONS if open_set is not None and candidate.expansion else (0.0,)):
                if open_set is not None:
                    if weight not in queries:
                        queries[weight] = open_set.queries(trained.vocabulary.rows, trained.vocabulary.vectors,
                                                           candidate.expansion.at(weight))
                    score = _open_score(vectors, open_set, trained.vocabulary, queries[weight])
                else:
                    score = hits(vectors @ trained.label_vectors.T, trained.truth, (1,))["hit1"]
                scores[f"{enrichment.to_dict() if enrichment else 'given'} T{top} expand {weight}"] = score
                if best is None or score > best[0] + 1e-9:
                    best = (score, enrichment, top, weight, candidate)
    score, enrichment, top, weight, modes = best
    figures["conse"] = {"rule": f"best {OPEN_SCORE}" if open_set is not None else "best flat hit@1",
                        "enrichment": enrichment.to_dict() if enrichment else None, "top": top, "expand": weight,
                        "score": score, "scores": scores}
    return modes.with_params(top=top, expand=weight)


def _choose_beta(modes: Modes, trained: _TrainedLabels, figures: dict) -> Modes:
    """hybrid's beta: the largest whose tag hit@1 stays within TOLERANCE of devise's."""
    devise, conse = modes.head(trained.features), modes.conse(trained.features)
    devise_flat, devise_tag = trained.figures(devise)
    beta, tags = 0.0, {}
    for candidate in BETAS[1:]:
        tags[str(candidate)] = trained.figures(modes.hybrid(devise, conse, candidate))[1]
        if tags[str(candidate)] < devise_tag - TOLERANCE:
            break
        beta = candidate
    figures.update(devise_flat_hit1=devise_flat, devise_tag_hit1=devise_tag, hybrid_beta=beta,
                   hybrid_tag_hit1_by_beta=tags)
    return modes.with_params(beta=beta)


def _choose_gate(modes: Modes, trained: _TrainedLabels, open_set: OpenSet | None, figures: dict) -> Modes:
    """gated's center and width: best OPEN_SCORE that keeps the trained labels' figures."""
    if open_set is None or modes.familiarity is None:
        figures["gate"] = {"rule": "defaults (no open-vocabulary validation photos)"}
        return modes
    devise = (figures["devise_flat_hit1"], figures["devise_tag_hit1"])
    parts = [(f, modes.embed(f, "hybrid"), modes.conse(f)) for f in (trained.features, open_set.features)]
    queries = open_set.queries(trained.vocabulary.rows, trained.vocabulary.vectors, modes.expand)
    best, scores = None, {}
    for center in GATE_CENTERS:
        for width in GATE_WIDTHS:
            (tf, th, tc), (of, oh, oc) = parts
            keeps = trained.keeps(modes.gated(tf, th, tc, center, width), devise)
            score = _open_score(modes.gated(of, oh, oc, center, width), open_set, trained.vocabulary, queries)
            scores[f"{center}/{width}"] = {"open_score": score, "keeps_trained_labels": keeps}
            if keeps and (best is None or score > best[0] + 1e-9):
                best = (score, center, width)
    figures["gate"] = {"rule": f"best {OPEN_SCORE} keeping flat and tag hit@1 within {TOLERANCE} of devise's",
                       "scores": scores}
    if best is None:
        return modes
    figures["gate"].update(center=best[1], width=best[2], open_score=best[0])
    return modes.with_params(gate_center=best[1], gate_width=best[2])


def _choose_default(modes: Modes, trained: _TrainedLabels, open_set: OpenSet | None, labels: list[str],
                    figures: dict) -> str:
    devise = (figures["devise_flat_hit1"], figures["devise_tag_hit1"])
    if open_set is None:
        vectors = {mode: modes.embed(trained.features, mode) for mode in ("devise", "hybrid")}
        concepts = concept_benchmark(vectors, [labels[t] for t in trained.truth], trained.vocabulary.rows,
                                     trained.vocabulary.vectors, expand=modes.expand)["mean"]
        figures.update(devise_concepts_p10=concepts["devise"], hybrid_concepts_p10=concepts["hybrid"],
                       default_rule="hybrid if beta > 0 and its concept precision@10 >= devise's, else devise")
        return "hybrid" if modes.params.beta > 0 and concepts["hybrid"] >= concepts["devise"] else "devise"
    candidates = {}
    for mode in MODES:
        if mode == "gated" and modes.familiarity is None:
            continue
        keeps = trained.keeps(modes.embed(trained.features, mode), devise)
        candidates[mode] = {**open_set.score(modes.embed(open_set.features, mode), trained.vocabulary.rows,
                                             trained.vocabulary.vectors, modes.expand),
                            "keeps_trained_labels": keeps}
    figures.update(modes=candidates, default_rule=f"best {OPEN_SCORE} among the modes keeping flat and tag "
                                                  f"hit@1 within {TOLERANCE} of devise's")
    return max((mode for mode, c in candidates.items() if c["keeps_trained_labels"]),
               key=lambda mode: candidates[mode]["score"])


def _choose_zero_shot(modes: Modes, extras: Extras, labels: list[str], label_vectors: np.ndarray,
                      features: np.ndarray, truth: np.ndarray) -> dict:
    """With the head trained without the held-out labels, on `features` (see zero_shot_rows): the hybrid
    beta and calibration gamma with the best unseen-photo hit@1 among all labels that keep seen-photo
    hit@1 >= SEEN_KEEP x devise's."""
    seen = np.asarray([label not in extras.held_out for label in labels])
    zs = modes.with_head(extras.zero_shot, label_vectors[seen])
    zs_devise, zs_conse = zs.head(features), zs.conse(features)
    floor = SEEN_KEEP * _split_hit1(zs_devise @ label_vectors.T, truth, seen)[1]
    best = (-1.0, 0.0, 0.0, 0.0, 0.0)
    for b in BETAS:
        base = zs.hybrid(zs_devise, zs_conse, b) @ label_vectors.T
        for g in GAMMAS:
            unseen_hit, seen_hit = _split_hit1(base - g * seen[None, :], truth, seen)
            if seen_hit >= floor and unseen_hit > best[0] + 1e-9:
                best = (unseen_hit, b, g, unseen_hit, seen_hit)
    _, beta, gamma, unseen_hit, seen_hit = best
    return {"held_out": extras.held_out, "beta": beta, "gamma": gamma, "images": int(len(truth)),
            "unseen_images": int((~seen[truth]).sum()), "validation_unseen_hit1": unseen_hit,
            "validation_seen_hit1": seen_hit, "seen_floor": floor,
            "rule": f"best unseen hit@1 among all labels keeping seen hit@1 >= {SEEN_KEEP} x devise's"}


def report(modes: Modes, features: np.ndarray, truth_labels: list[str], labels: list[str], vocabulary: Vocabulary,
           extras: Extras | None = None, ids: list[str] | None = None) -> dict:
    """The quality report on labelled images (features of the evaluated split, true label names)."""
    rows, word_vectors = vocabulary.rows, vocabulary.vectors
    label_vectors = label_matrix(labels, rows, word_vectors)
    keep = np.asarray([t in labels for t in truth_labels])
    features = features[keep]
    truth_labels = [t for t, k in zip(truth_labels, keep) if k]
    ids = [i for i, k in zip(ids or [str(n) for n in range(len(keep))], keep) if k]
    truth = np.asarray([labels.index(t) for t in truth_labels])
    truth_words = [t.lower() for t in truth_labels]
    out: dict = {"images": int(len(truth)), "labels": labels, "vocabulary": len(vocabulary.words),
                 "params": modes.params.to_dict(), "default_mode": modes.params.default}
    vectors = {mode: modes.embed(features, mode) for mode in MODES}
    out["flat"] = {mode: hits(vectors[mode] @ label_vectors.T, truth) for mode in MODES}
    if extras is not None:
        out["flat"]["softmax_baseline"] = hits(extras.softmax(features), truth)
    out["flat"]["random"] = {f"hit{k}": min(1.0, k / len(labels)) for k in (1, 2, 5)}
    out["tags"] = {mode: tag_hits(vectors[mode], truth_words, vocabulary.rows, word_vectors) for mode in MODES}
    if extras is not None:
        out["zero_shot"] = _zero_shot_report(modes, extras, features, truth, truth_labels, labels, label_vectors,
                                             vocabulary)
    out["concepts"] = concept_benchmark(vectors, truth_labels, rows, word_vectors, expand=modes.expand)
    out["examples"] = _examples(vectors[modes.params.default], vocabulary, modes.expand, ids, truth_labels)
    return out


def _zero_shot_report(modes: Modes, extras: Extras, features: np.ndarray, truth: np.ndarray, truth_labels: list[str],
                      labels: list[str], label_vectors: np.ndarray, vocabulary: Vocabulary) -> dict:
    """The report's zero-shot block: the head trained without the held-out labels, per setting."""
    seen = np.asarray([label not in extras.held_out for label in labels])
    zs = modes.with_head(extras.zero_shot, label_vectors[seen])
    zero = modes.params.chosen_on.get("zero_shot") or {}
    beta, gamma = float(zero.get("beta", modes.params.beta)), float(zero.get("gamma", modes.params.gamma))
    block = {"held_out": extras.held_out, "beta": beta, "gamma": gamma,
             "unseen_photos": int((~seen[truth]).sum()), "seen_photos": int(seen[truth].sum()),
             "random_hit1_all": 1 / len(labels)}
    settings = {"devise": ("devise", 1.0, 0.0), "conse": ("conse", 0.0, 0.0),
                "hybrid_uncalibrated": ("hybrid", beta, 0.0), "hybrid": ("hybrid", beta, gamma)}
    for name, (mode, a, g) in settings.items():
        scores = zero_shot_scores(zs, features, label_vectors, seen, mode, a, g)
        unseen_all, seen_all = _split_hit1(scores, truth, seen)
        unseen_only = np.where(seen[None, :], -np.inf, scores)
        seen_only = np.where(~seen[None, :], -np.inf, scores)
        u = ~seen[truth]
        block[name] = {
            "unseen_hit1_all": unseen_all, "seen_hit1_all": seen_all,
            "unseen_hit1_among_unseen": float(np.mean(unseen_only[u].argmax(1) == truth[u])) if u.any() else 0.0,
            "seen_hit1_among_seen": float(np.mean(seen_only[~u].argmax(1) == truth[~u])) if (~u).any() else 0.0,
        }
    zs_vectors = {mode: zs.embed(features, mode, beta=beta) for mode in MODES}
    block["concepts_p10"] = concept_benchmark(zs_vectors, truth_labels, vocabulary.rows, vocabulary.vectors,
                                              expand=modes.expand,
                                              only={c for c, rel in CONCEPTS.items() if set(rel) & set(extras.held_out)})
    return block


def _examples(default: np.ndarray, vocabulary: Vocabulary, expand: Expand | None, ids: list[str],
              truth_labels: list[str]) -> dict:
    """The example queries' top 5 photos in the default mode."""
    examples = {}
    for text in EXAMPLES:
        vector = _query(text, vocabulary.rows, vocabulary.vectors, expand)
        if vector is None:
            continue
        top = np.argsort(-(default @ vector))[:5]
        examples[text] = [{"id": ids[i], "label": truth_labels[i], "score": round(float(default[i] @ vector), 3)}
                          for i in top]
    return examples


def _query(text: str, rows: dict[str, int], word_vectors: np.ndarray, expand: Expand | None = None) -> np.ndarray | None:
    from services.encoder import query

    try:
        return query.embed(query.parse(text), rows, word_vectors, expand)
    except (query.QueryError, query.UnknownWordsError):
        return None


def concept_benchmark(vectors: dict[str, np.ndarray], truth_labels: list[str], rows: dict[str, int],
                      word_vectors: np.ndarray, k: int = 10, only: set[str] | None = None,
                      expand: Expand | None = None) -> dict:
    """precision@k of text -> image search for each concept word, per mode, and the mean."""
    present = set(truth_labels)
    truth = np.asarray(truth_labels)
    out: dict = {"k": k, "queries": {}, "mean": {}}
    for concept, relevant in CONCEPTS.items():
        if only is not None and concept not in only:
            continue
        if concept not in rows or not set(relevant) & present:
            continue
        vector = _query(concept, rows, word_vectors, expand)
        out["queries"][concept] = {"relevant": list(relevant)}
        for mode, mode_vectors in vectors.items():
            top = np.argsort(-(mode_vectors @ vector))[:k]
            out["queries"][concept][mode] = float(np.mean(np.isin(truth[top], relevant)))
    for mode in vectors:
        values = [q[mode] for q in out["queries"].values()]
        out["mean"][mode] = float(np.mean(values)) if values else 0.0
    return out


def choice_lines(params: dict) -> list[str]:
    """How the mode parameters were chosen, for people (from ModeParams.chosen_on)."""
    chosen = params.get("chosen_on") or {}
    open_set = chosen.get("open_vocabulary") or {}
    where = (f"the training folder's validation split ({chosen.get('images')} photos) and "
             f"{open_set['photos']} real photos of {len(open_set['categories'])} categories ({open_set['split']})"
             if open_set else f"the training folder's validation split ({chosen.get('images')} photos)")
    conse, gate = chosen.get("conse") or {}, chosen.get("gate") or {}
    lines = ["", f"Mode parameters, chosen on {where}; no test figure was looked at:", "",
             f"- default mode `{params['default']}`: {chosen.get('default_rule', '-')}",
             f"- ConSE: T={params['top']}, class vectors {conse.get('enrichment')}, text query expansion weight "
             f"{params.get('expand', 0.0)}: {conse.get('rule', '-')}",
             f"- hybrid beta={params['beta']}: the largest keeping tag hit@1 within {TOLERANCE} of devise's",
             f"- gated center={params.get('gate_center')}, width={params.get('gate_width')}: {gate.get('rule', '-')}"]
    for mode, figures in (chosen.get("modes") or {}).items():
        broad = f", broad-word P@10 {figures['broad_p10']:.3f}" if figures.get("broad_p10") is not None else ""
        lines.append(f"  - {mode}: open-vocabulary validation mAP {figures['map']:.3f}{broad}, keeps the trained "
                     f"labels' figures: {'yes' if figures['keeps_trained_labels'] else 'no'}")
    return lines


def markdown(result: dict) -> str:
    """A short table for people."""
    f = lambda x: f"{x:.3f}"  # noqa: E731
    lines = [f"Quality on {result['images']} images ({result.get('data', 'validation split')}); "
             f"default mode: {result['default_mode']}", "",
             "| mode | flat hit@1 | hit@2 | hit@5 | tag hit@1 | tag hit@5 | tag hit@10 | concepts p@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in (*MODES, "softmax_baseline", "random"):
        if mode not in result["flat"]:
            continue
        flat, tags = result["flat"][mode], result["tags"].get(mode)
        tag_cells = [f(tags[f"tag_hit{k}"]) for k in (1, 5, 10)] if tags else ["-"] * 3
        concepts = result["concepts"]["mean"].get(mode)
        lines.append(f"| {mode} | {f(flat['hit1'])} | {f(flat['hit2'])} | {f(flat['hit5'])} | "
                     + " | ".join(tag_cells) + f" | {f(concepts) if concepts is not None else '-'} |")
    zero = result.get("zero_shot")
    if zero:
        lines += ["", f"Zero-shot: head trained without {', '.join(zero['held_out'])} "
                      f"({zero['unseen_photos']} unseen, {zero['seen_photos']} seen photos; "
                      f"hybrid beta {zero['beta']}, gamma {zero['gamma']}, chosen on validation)", "",
                  "| mode | unseen photos: hit@1 all labels | among unseen | seen photos: hit@1 all labels "
                  "| among seen | concepts p@10 |", "|---|---|---|---|---|---|"]
        for mode in ("devise", "conse", "hybrid_uncalibrated", "hybrid"):
            row = zero[mode]
            concepts = zero["concepts_p10"]["mean"].get(mode.replace("_uncalibrated", ""))
            lines.append(f"| {mode} | {f(row['unseen_hit1_all'])} | {f(row['unseen_hit1_among_unseen'])} | "
                         f"{f(row['seen_hit1_all'])} | {f(row['seen_hit1_among_seen'])} | "
                         f"{f(concepts) if concepts is not None and mode != 'hybrid_uncalibrated' else '-'} |")
    lines += ["", "Concept benchmark (precision@10, text -> image):", "",
              "| query | relevant | " + " | ".join(MODES) + " |", "|---|---|" + "---|" * len(MODES)]
    for concept, row in result["concepts"]["queries"].items():
        lines.append(f"| {concept} | {', '.join(row['relevant'])} | " + " | ".join(f(row[m]) for m in MODES) + " |")
    lines += choice_lines(result["params"])
    lines += ["", "Example queries (default mode, top 5):", ""]
    for text, answers in result["examples"].items():
        lines.append(f"- `{text}`: " + ", ".join(f"{a['id']} ({a['score']})" for a in answers))
    return "\n".join(lines) + "\n"


def gallery(path: Path, vectors: dict[str, np.ndarray], image_paths: list[str], ids: list[str],
            truth_labels: list[str], rows: dict[str, int], word_vectors: np.ndarray,
            queries=GALLERY_QUERIES, k: int = 10, title: str = "", relevance: bool = True,
            expand: Expand | None = None) -> Path:
    """One HTML page: for each concept query, the top k photos of each mode side by side."""
    from services.gateway.gallery import STYLE, figure_html

    heading = "Concept queries: " + ", ".join(vectors) + (f" ({title})" if title else "")
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(heading)}</title>",
             f"<style>{STYLE}</style><h1>{html.escape(heading)}</h1>"]
    for text in queries:
        vector = _query(text, rows, word_vectors, expand)
        if vector is None:
            continue
        relevant = CONCEPTS.get(text, ()) if relevance else ()
        for mode, mode_vectors in vectors.items():
            scores = mode_vectors @ vector
            top = np.argsort(-scores)[:k]
            figure = (f"p@{k} {np.mean([truth_labels[i] in relevant for i in top]):.1f}; relevant: "
                      f"{html.escape(', '.join(relevant))}" if relevant else f"top {k}")
            parts.append(f"<h2>{html.escape(text)} - {mode} ({figure})</h2><div class='grid'>")
            parts.extend(figure_html(image_paths[i], f"{rank}. {html.escape(ids[i])}<br>{scores[i]:.3f}")
                         for rank, i in enumerate(top, 1))
            parts.append("</div>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path
