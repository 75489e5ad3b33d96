"""Explanations of image results: each query term's share of the score (services/common/mixing.py), the
image's nearest words (its own top tags) and nearest ImageNet classes. Pure: the downstream answers
come in, one batched call each, and the Explanation messages go out."""

from __future__ import annotations

import numpy as np

from semsearch.v1 import encoder_pb2, gateway_pb2, index_pb2
from services.common.mixing import WeightedVector, shares

WORDS = 5  # nearest words per result
CLASSES = 3  # nearest ImageNet classes per result


def result_vectors(response: index_pb2.IndexSearchResponse) -> np.ndarray:
    """(results, D) stored vectors of the results, as the index returned them (with_vectors)."""
    if not response.neighbors:
        return np.zeros((0, 0), np.float32)
    return np.asarray([n.vector.values for n in response.neighbors], np.float32)


def term_shares(terms: list[WeightedVector], norm: float, vectors: np.ndarray) -> list[list[gateway_pb2.TermShare]]:
    """Per result: each term's share of its score, in term order."""
    table = shares(terms, norm, vectors)
    return [[gateway_pb2.TermShare(term=term.name, weight=term.weight, share=float(value))
             for term, value in zip(terms, row)] for row in table]


def single_term_shares(name: str, response: index_pb2.IndexSearchResponse) -> list[list[gateway_pb2.TermShare]]:
    """A query of one unit term of weight 1 (SimilarImages' image): its share is the whole score."""
    return [[gateway_pb2.TermShare(term=name, weight=1.0, share=n.score)] for n in response.neighbors]


def explanations(share_lists: list[list[gateway_pb2.TermShare]], words: index_pb2.IndexSearchManyResponse | None,
                 classes: encoder_pb2.NearestClassesResponse | None) -> list[gateway_pb2.Explanation]:
    """One Explanation per result, from the shares and the batched word and class answers (None: no results)."""
    out = []
    for position, result_shares in enumerate(share_lists):
        near = words.results[position].neighbors if words is not None else []
        kinds = classes.lists[position].classes if classes is not None and position < len(classes.lists) else []
        out.append(gateway_pb2.Explanation(
            shares=result_shares,
            words=[gateway_pb2.WordResult(word=n.id, score=n.score) for n in near],
            classes=[gateway_pb2.ClassResult(name=c.name, score=c.score) for c in kinds]))
    return out
