"""Stage 3: ScaNN indexes for the searchable images and for the whole word vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batch.images import ImageRecord
from services.common import artifact
from services.encoder.word_vectors import WordVectors
from services.index.core import Item, VectorIndex


def build_indexes(staging: Path, image_vectors: np.ndarray, images: list[ImageRecord], words: WordVectors) -> dict:
    """Build and save both indexes under `staging/indexes/`; returns their descriptions."""
    built = {
        "images": VectorIndex.build("images", image_vectors, [Item(r.id, r.path, r.label) for r in images]),
        "words": VectorIndex.build("words", words.vectors, [Item(word) for word in words.words]),
    }
    for name, index in built.items():
        index.save(staging / artifact.INDEXES / name)
    return {name: {"size": len(index), "dimension": index.dimension, **index.config.__dict__}
            for name, index in built.items()}
