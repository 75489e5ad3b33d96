"""Stage 3: ScaNN indexes for the searchable images (optionally as shards) and for the whole vocabulary."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from batch.images import ImageRecord
from batch.publish import link_or_copy
from services.common import artifact
from services.encoder.word_vectors import WordVectors
from services.common.items import Item
from services.common.taken import taken
from services.common.shards import SHARD_DIR, shard_of
from services.index.core import ScannConfig, VectorIndex

log = logging.getLogger(__name__)


def build_indexes(staging: Path, image_vectors: np.ndarray, images: list[ImageRecord], words: WordVectors,
                  shards: int = 1, cache: Path | None = None, features: np.ndarray | None = None
                  ) -> dict[str, artifact.IndexInfo]:
    """Build and save both indexes under `staging/indexes/`; returns their descriptions. With `cache`, the
    word index (the same for every run on one word-vector file) is built once and linked from there;
    `features`: the images' backbone features, kept beside the image index (near-duplicates)."""
    return {"images": build_image_index(staging, image_vectors, images, shards, features),
            "words": build_word_index(staging / artifact.INDEXES / "words", words, cache)}


def build_word_index(folder: Path, words: WordVectors, cache: Path | None = None) -> artifact.IndexInfo:
    config = ScannConfig.for_size(len(words.words))
    if cache is None:
        VectorIndex.build("words", words.vectors, [Item(word) for word in words.words], config).save(folder)
    else:
        cached = cached_word_index(cache / "word-indexes", words, config)
        for path in cached.rglob("*"):
            if path.is_file():
                link_or_copy(path, folder / path.relative_to(cached))
    return artifact.IndexInfo(len(words.words), words.dimension, 1, dict(config.__dict__))


def cached_word_index(cache: Path, words: WordVectors, config: ScannConfig) -> Path:
    """The saved word index for exactly these words, vectors, ScaNN configuration and ScaNN version,
    built and saved (atomically) the first time it is asked for."""
    key = hashlib.sha256(np.ascontiguousarray(words.vectors, dtype=np.float32).tobytes())
    key.update("\n".join(words.words).encode())
    key.update(json.dumps([config.__dict__, version("scann")], sort_keys=True).encode())
    folder = cache / key.hexdigest()[:32]
    if folder.is_dir():
        log.info("word index: %d words from the cache (%s)", len(words.words), folder)
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        VectorIndex.build("words", words.vectors, [Item(word) for word in words.words], config).save(building)
        os.rename(building, folder)
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
        if not folder.is_dir():  # not another job that finished the same index first
            raise
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return folder


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
