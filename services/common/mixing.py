"""One query vector from weighted terms (words and images), and each term's share of a result's score.

A query of terms i with weights w_i and vectors v_i (a word's or an image's unit vector; a phrase's
summed word vectors) is

    q = s / ||s||,   s = sum_i w_i v_i

which for words alone is exactly the query language's embedding (services/encoder/query.py). A result
x (a unit vector in the image index) scores q . x = sum_i w_i (v_i . x) / ||s||, so term i's share of
the score is w_i (v_i . x) / ||s||, and the shares add up to the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MixError(ValueError):
    """The terms make no query: none with a positive weight, or they cancel out."""


@dataclass(frozen=True)
class WeightedVector:
    name: str  # as explanations show it: `dog`, `golf ball`, `img:beach/0001.jpg`, `image 1`
    weight: float
    vector: np.ndarray  # (D,)


@dataclass(frozen=True)
class Mixed:
    """The query's unit vector and the length of the weighted sum it was normalised from."""

    vector: np.ndarray
    norm: float


def combine(terms: list[WeightedVector]) -> Mixed:
    """unit(sum of weight * vector); MixError without a positive weight or when the terms cancel out."""
    if not any(term.weight > 0 for term in terms):
        raise MixError("the query needs at least one term with a positive weight")
    total = np.zeros(len(terms[0].vector), np.float64)
    for term in terms:
        total += term.weight * np.asarray(term.vector, np.float64)
    norm = float(np.linalg.norm(total))
    if norm < 1e-9:
        raise MixError("the query's terms cancel out")
    return Mixed((total / norm).astype(np.float32), norm)


def shares(terms: list[WeightedVector], norm: float, results: np.ndarray) -> np.ndarray:
    """(results, terms): w_i (v_i . x) / norm for each result x (rows of `results`) and term i."""
    if not len(results):
        return np.zeros((0, len(terms)), np.float64)
    vectors = np.stack([np.asarray(term.vector, np.float64) for term in terms])
    weights = np.asarray([term.weight for term in terms], np.float64)
    return (np.asarray(results, np.float64) @ vectors.T) * weights[None, :] / norm
