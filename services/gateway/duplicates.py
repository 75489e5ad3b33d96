"""Near-duplicate groups: images whose backbone features (their square roots, root_features) have cosine
similarity >= a threshold.

Candidates are exact: every pair is compared, in blocks of matrix products (float16 features, float32
products), so the cost is n^2/2 dot products of the feature dimension (1,280 for EfficientNet-Lite)
and the memory one block of scores beside the features. The pairs at or above the threshold are then
joined, most similar first, by average linkage: two groups become one only when the mean similarity
over all pairs across them is >= the threshold too, so one close pair between two different photos'
groups does not chain them together (connected components would; README "Near-duplicates" has both
measured, and how the default threshold was chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Chosen per backbone on the validation copies of bench/duplicates.py (README, "Near-duplicates"): the lowest
# threshold whose pair precision is >= 0.99, on root_features. Other backbones were not measured and take
# Lite0's.
DEFAULT_THRESHOLDS = {"efficientnet-lite0": 0.87, "efficientnet-lite2": 0.86}
DEFAULT_THRESHOLD = DEFAULT_THRESHOLDS["efficientnet-lite0"]
MIN_THRESHOLD = 0.7  # below it pairs of unrelated photos are common (the features are non-negative)
MAX_PAIRS = 5_000_000  # candidate pairs one call may hold (a threshold too low for the collection)
ROW_BLOCK = 1024
COLUMN_BLOCK = 8192


def default_threshold(backbone: str) -> float:
    """The default threshold for features of `backbone` (artifact.Backbone.identity, or just its name)."""
    return DEFAULT_THRESHOLDS.get(backbone.split(":")[0], DEFAULT_THRESHOLD)


class TooManyPairs(ValueError):
    """More than MAX_PAIRS pairs reach the threshold."""


@dataclass(frozen=True)
class Group:
    """Rows of one group, its most central member first; `scores`: each member's similarity to it."""

    rows: list[int]
    scores: list[float]


def root_features(features: np.ndarray) -> np.ndarray:
    """Unit backbone features -> the vectors compared: each value's square root, made unit again (float16).
    Power normalisation (as RootSIFT does) keeps a few large values from dominating the cosine, so copies of
    one photo stand out from other photos of the same kind: on the validation copies, at the rule's threshold
    (precision >= 0.99), it raised recall from 0.878 to 0.998 with Lite2 and from 0.978 to 0.987 with Lite0
    (README, "Near-duplicates")."""
    out = np.empty(features.shape, np.float16)
    for start in range(0, len(features), COLUMN_BLOCK):
        block = np.sqrt(np.maximum(features[start:start + COLUMN_BLOCK].astype(np.float32), 0.0))
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + COLUMN_BLOCK] = block / np.where(norms > 0, norms, 1.0)
    return out


def threshold_problem(threshold: float) -> str | None:
    if not math.isfinite(threshold) or not MIN_THRESHOLD <= threshold <= 1.0:
        return (f"threshold must be a number from {MIN_THRESHOLD} to 1 (cosine similarity of backbone features); "
                f"got {threshold}")
    return None


def similar_pairs(features: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows whose dot product is >= threshold: (i, j, similarity) arrays.
    TooManyPairs past MAX_PAIRS."""
    firsts, seconds, scores, found = [], [], [], 0
    n = len(features)
    for start in range(0, n, ROW_BLOCK):
        rows = features[start:start + ROW_BLOCK].astype(np.float32)
        for column in range(start, n, COLUMN_BLOCK):
            block = rows @ features[column:column + COLUMN_BLOCK].astype(np.float32).T
            i, j = np.nonzero(block >= threshold)
            keep = i + start < j + column
            i, j = i[keep], j[keep]
            found += len(i)
            if found > MAX_PAIRS:
                raise TooManyPairs(f"more than {MAX_PAIRS:,} pairs of images are at least {threshold} similar; "
                                   "ask with a higher threshold (or a folder)")
            firsts.append(i + start)
            seconds.append(j + column)
            scores.append(block[i, j])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(scores)


def average_linkage(features: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                    threshold: float) -> list[list[int]]:
    """Groups of at least two rows: the pairs, most similar first, join their rows' groups when the mean
    similarity across the two groups (one dot product of their sums of unit vectors) is >= threshold.
    Passes repeat until one joins nothing (a pair refused early may be accepted after other joins)."""
    firsts, seconds, scores = pairs
    parent: dict[int, int] = {}
    sums: dict[int, np.ndarray] = {}
    sizes: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    order = np.argsort(-scores, kind="stable")
    edges = list(zip(firsts[order].tolist(), seconds[order].tolist()))
    joined = True
    while joined:
        joined = False
        for a, b in edges:
            ra, rb = root(a), root(b)
            if ra == rb:
                continue
            sa, sb = sums.get(ra), sums.get(rb)
            sa = features[ra].astype(np.float32) if sa is None else sa
            sb = features[rb].astype(np.float32) if sb is None else sb
            na, nb = sizes.get(ra, 1), sizes.get(rb, 1)
            if float(sa @ sb) / (na * nb) >= threshold:
                low, high = min(ra, rb), max(ra, rb)
                parent[high] = low
                sums[low], sizes[low] = sa + sb, na + nb
                sums.pop(high, None)
                joined = True
    members: dict[int, list[int]] = {}
    for row in sorted(set(firsts.tolist()) | set(seconds.tolist())):
        members.setdefault(root(row), []).append(row)
    return [rows for rows in members.values() if len(rows) > 1]


def describe(features: np.ndarray, rows: list[int]) -> Group:
    """A group with its medoid (highest summed similarity to the others) first, the rest by similarity to it."""
    block = features[rows].astype(np.float32)
    similarity = block @ block.T
    center = int(np.argmax(similarity.sum(axis=1)))
    order = sorted(range(len(rows)), key=lambda m: (m != center, -similarity[center, m], rows[m]))
    return Group([rows[m] for m in order], [1.0 if m == center else float(similarity[center, m]) for m in order])


def near_duplicate_groups(features: np.ndarray, threshold: float) -> list[Group]:
    """Groups of rows of unit `features` (average_linkage over similar_pairs); largest first, then by the
    highest similarity inside, then by first row. ValueError for a threshold out of range, TooManyPairs
    (a ValueError) for one too low for the collection."""
    problem = threshold_problem(threshold)
    if problem:
        raise ValueError(problem)
    found = average_linkage(features, similar_pairs(features, threshold), threshold)
    groups = [describe(features, rows) for rows in found]
    return sorted(groups, key=lambda g: (-len(g.rows), -max(g.scores[1:]), g.rows[0]))
