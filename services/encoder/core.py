"""EncoderCore: text and images -> unit vectors in the artifact's word space (no gRPC here)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from services.common import artifact
from services.common.items import read_items
from services.encoder import query
from services.encoder.image_encoder import ImageEncoder
from services.encoder.modes import FILE as MODES_FILE, MODES, ModeParams, Modes
from services.encoder.word_vectors import WordVectors

log = logging.getLogger(__name__)


class EncoderCore:
    def __init__(self, artifact_path: str | Path, threads: int = 0, decode_slots: threading.Semaphore | None = None):
        self.directory = artifact.resolve(artifact_path)
        self.manifest = artifact.read_manifest(self.directory)
        words_dir = self.directory / artifact.INDEXES / "words"
        words = WordVectors([item.id for item in read_items(words_dir / "items.jsonl")],
                            np.load(words_dir / "vectors.npy"), self.manifest.word_vectors.source)
        self.words, self.word_vectors, self.rows = words.words, words.vectors, words.index()
        self.images = ImageEncoder(
            self.directory / artifact.BACKBONE,
            self.manifest.backbone.preprocessing,
            self.directory / artifact.HEAD,
            threads=threads,
            decode_slots=decode_slots,
        )
        self.modes = Modes.load(self.directory / MODES_FILE, self.images.head,
                                ModeParams.from_dict(self.manifest.modes))
        log.info("encoder loaded %s: %d words, dimension %d", self.version, len(self.words), self.dimension)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    def encode_text(self, text: str) -> tuple[np.ndarray, list[query.Term]]:
        """QueryError for a malformed query, UnknownWordsError naming words without a vector."""
        terms = query.parse(text)
        return query.embed(terms, self.rows, self.word_vectors, self.modes.expand), terms

    def text_terms(self, text: str) -> tuple[list[query.Term], list[query.TermVector]]:
        """The words of a larger query (the gateway adds image terms): each term's vector, with none of
        the checks on the whole query (a positive weight, terms that cancel out)."""
        terms = query.parse(text, whole=False)
        return terms, query.term_vectors(terms, self.rows, self.word_vectors, self.modes.expand)

    def nearest_classes(self, vectors: np.ndarray, k: int, mode: str | None = None) -> list[list[tuple[str, float]]]:
        """The k ImageNet classes nearest each vector in word space (`Modes.nearest_classes`); none in
        devise, whose vectors owe nothing to the class table. UnknownModeError for a mode not in `list_modes()`."""
        if self.modes.check(mode) == "devise":
            return [[] for _ in vectors]
        return self.modes.nearest_classes(vectors, k)

    @property
    def default_mode(self) -> str:
        return self.modes.params.default

    def list_modes(self) -> list[str]:
        """The modes `encode_images` accepts (`devise`, `conse`, `hybrid`, `gated`)."""
        return list(MODES)

    def encode_images(self, images: list[bytes], mode: str | None = None) -> np.ndarray:
        """Images -> unit vectors with `mode` (None: the artifact's default mode).

        ImageError for bytes that are not a readable image; modes.UnknownModeError (a
        ValueError) for a mode not in `list_modes()`.
        """
        return self.encode_images_and_features(images, mode)[0]

    def encode_images_and_features(self, images: list[bytes], mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As encode_images, and the images' backbone features too (for near-duplicate search)."""
        mode = self.modes.check(mode)
        features = self.images.features(images)
        return self.modes.embed(features, mode), features

    def info(self) -> dict:
        return {
            "dimension": self.dimension,
            "backbone": self.manifest.backbone.name,
            "word_vectors": self.manifest.word_vectors.source,
            "vocabulary_size": len(self.words),
            "artifact_version": self.version,
        }
