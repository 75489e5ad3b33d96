"""Stage 3: ScaNN indexes for the searchable images (optionally as shards) and for the whole vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batch.images import ImageRecord
from services.common import artifact
from services.encoder.word_vectors import WordVectors
from services.common.items import Item
from services.common.taken import taken
from services.common.shards import SHARD_DIR, shard_of
from services.index.core import VectorIndex


def build_indexes(staging: Path, image_vectors: np.ndarray, images: list[ImageRecord], words: WordVectors,
                  shards: int = 1, features: np.ndarray | None = None) -> dict[str, artifact.IndexInfo]:
    """Build and save both indexes under `staging/indexes/`; returns their descriptions."""
    words_index = VectorIndex.build("words", words.vectors, [Item(word) for word in words.words])
    words_index.save(staging / artifact.INDEXES / "words")
    return {"images": build_image_index(staging, image_vectors, images, shards, features),
            "words": artifact.IndexInfo(len(words_index), words_index.dimension, 1, dict(words_index.config.__dict__))}


def build_image_index(staging: Path, image_vectors: np.ndarray, images: list[ImageRecord],
                      shards: int = 1, features: np.ndarray | None = None) -> artifact.IndexInfo:
    """Build and save the image index under `staging/indexes/images/`; returns its description.

    `features`: the images' backbone features, in their rows, kept beside the vectors (unit length,
    float16) for near-duplicate search. With `shards` > 1 it is split by a hash of each image's id into
    `indexes/images/shard-<i>/`, one folder per index process.
    """
    folder = staging / artifact.INDEXES / "images"
    items = [Item(r.id, r.path, r.label, taken(r.path)) for r in images]
    if shards > 1:
        owner = np.asarray([shard_of(item.id, shards) for item in items])
        for shard in range(shards):
            rows = np.flatnonzero(owner == shard)
            part = VectorIndex.build("images", image_vectors[rows], [items[row] for row in rows],
                                     features=None if features is None else features[rows])
            part.save(folder / SHARD_DIR.format(shard))
        index = part
    else:
        index = VectorIndex.build("images", image_vectors, items, features=features)
        index.save(folder)
    return artifact.IndexInfo(len(items), index.dimension, shards, dict(index.config.__dict__))
