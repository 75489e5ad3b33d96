"""The text query language: `cat sofa` (mean), `cat+sofa-dog` or `cat + sofa - dog` (minus subtracts),
`cat:2 sofa` (weights). Image terms (`img:ID`, services/common/image_terms.py) are the gateway's: it takes
them out before the words reach the encoder."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common import image_terms
from services.common.errors import listed, quoted

MAX_QUERY_CHARS = 1000
MAX_TERMS = 64
MAX_PHRASE_WORDS = 4  # the longest run of query words looked up as one phrase (`golf ball`)

_TERM = re.compile(r"([+-]?)\s*([^\s+\-:]+)(?::([0-9]*\.?[0-9]+))?")


class QueryError(ValueError):
    """The query cannot be parsed (empty, too long, malformed)."""


class UnknownWordsError(KeyError):
    """Some query words have no vector."""

    def __init__(self, words: list[str]):
        super().__init__(words)
        self.words = words

    def __str__(self) -> str:
        return "unknown word" + ("s" if len(self.words) > 1 else "") + ": " + listed(self.words, quote=False)


@dataclass(frozen=True)
class Term:
    word: str
    weight: float


def parse(text: str, whole: bool = True) -> list[Term]:
    """Split a query into weighted terms; words are lower-cased (GloVe 6B is lower case).

    `whole=False`: the words are part of a larger query (the gateway adds image terms), so they need
    no positive weight of their own, and may be none at all."""
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query is {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    image = image_terms.find(text)
    if image:
        raise QueryError(f"image terms such as {quoted(image)} are resolved by the gateway's Search; "
                         "the encoder embeds words only")
    stripped = text.strip()
    if not stripped:
        if not whole:
            return []
        raise QueryError("query is empty")
    terms: list[Term] = []
    position = 0
    for match in _TERM.finditer(stripped):
        gap = stripped[position:match.start()]
        if gap.strip():
            raise QueryError(f"cannot parse {quoted(gap.strip())} in the query")
        position = match.end()
        sign, word, weight = match.groups()
        value = float(weight) if weight is not None else 1.0
        if not math.isfinite(value):
            raise QueryError(f"weight of {quoted(word)} is not a finite number")
        terms.append(Term(word.lower(), -value if sign == "-" else value))
    rest = stripped[position:].strip()
    if rest:
        raise QueryError(f"cannot parse {quoted(rest)} in the query")
    if len(terms) > MAX_TERMS:
        raise QueryError(f"query has {len(terms)} terms; the limit is {MAX_TERMS}")
    if whole and not any(term.weight > 0 for term in terms):
        raise QueryError("query needs at least one word with a positive weight")
    return terms


_EDGE_PUNCTUATION = ".,;:!?\"'()[]{}"


def _vocabulary_word(word: str, rows: dict[str, int]) -> str | None:
    """The word as the vocabulary has it; failing that, without punctuation at its ends (`hello,`)."""
    if word in rows:
        return word
    bare = word.strip(_EDGE_PUNCTUATION)
    return bare if bare and bare in rows else None


class Expand(Protocol):
    """Query expansion (services/encoder/modes.py): a word's or a known phrase's vector, moved."""

    def __contains__(self, phrase: str) -> bool: ...  # a phrase of several words that expands as one

    def __call__(self, word: str, vector: np.ndarray) -> np.ndarray: ...


def _groups(words: list[str], weights: list[float], expand: Expand | None) -> list[tuple[list[str], float]]:
    """The query's words in order, runs of equal weight that `expand` knows as a phrase joined (longest first)."""
    groups, start = [], 0
    while start < len(words):
        size = 1
        if expand is not None:
            for longer in range(min(MAX_PHRASE_WORDS, len(words) - start), 1, -1):
                run = slice(start, start + longer)
                if len(set(weights[run])) == 1 and " ".join(words[run]) in expand:
                    size = longer
                    break
        groups.append((words[start:start + size], weights[start]))
        start += size
    return groups


@dataclass(frozen=True)
class TermVector:
    """A query term as embedded: a word, or a known phrase of words of equal weight (`golf ball`)."""

    term: str
    weight: float
    length: float  # of the summed unit vectors of its words: 1 for a word
    direction: np.ndarray  # unit, after query expansion

    @property
    def vector(self) -> np.ndarray:
        """What the term adds to the query per unit of weight."""
        return (self.length * self.direction).astype(np.float32)


def term_vectors(terms: list[Term], rows: dict[str, int], vectors: np.ndarray,
                 expand: Expand | None = None) -> list[TermVector]:
    """Each term's vector, through `expand` if given (the encoder's query expansion, services/encoder/modes.py).
    Consecutive words of equal weight that `expand` knows as a phrase count as one term: the sum of their
    vectors, its direction expanded as the phrase (`golf ball` towards the golf ball class, not towards
    golf and towards balls). UnknownWordsError names every word without a vector."""
    found = {term.word: _vocabulary_word(term.word, rows) for term in terms}
    unknown = [word for word, known in found.items() if known is None]
    if unknown:
        raise UnknownWordsError(unknown)
    out = []
    for words, weight in _groups([found[t.word] for t in terms], [t.weight for t in terms], expand):
        summed = vectors[[rows[word] for word in words]].sum(axis=0)
        length = float(np.linalg.norm(summed))
        if length > 0:
            phrase = " ".join(words)
            out.append(TermVector(phrase, weight, length, expand(phrase, summed / length) if expand else summed / length))
    return out


def embed(terms: list[Term], rows: dict[str, int], vectors: np.ndarray, expand: Expand | None = None) -> np.ndarray:
    """The unit vector of the weighted sum of the terms' vectors (`term_vectors`)."""
    total = np.zeros(vectors.shape[1], dtype=np.float32)
    for term in term_vectors(terms, rows, vectors, expand):
        total += term.weight * term.length * term.direction
    norm = float(np.linalg.norm(total))
    if norm == 0.0:
        raise QueryError("the query's terms cancel out")
    return total / norm
