"""Word vectors: a vocabulary and its unit rows, as the artifact stores them (batch/word_vectors.py loads
the source files)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WordVectors:
    """A vocabulary and its L2-normalised vectors (float32, one row per word)."""

    words: list[str]
    vectors: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.words) != self.vectors.shape[0]:
            raise ValueError(
                f"{len(self.words)} words but vectors of shape {self.vectors.shape}"
            )

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def index(self) -> dict[str, int]:
        """Word -> row; the first occurrence wins when a file repeats a word."""
        rows: dict[str, int] = {}
        for row, word in enumerate(self.words):
            rows.setdefault(word, row)
        return rows
