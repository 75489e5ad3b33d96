"""ImageEncoder: the ONNX backbone (and, once trained, the head) over images.

The same class runs inside the encoder service and, as batch/extract.py's `FeatureExtractor`, as
the callable class of Ray Data's `map_batches` in the batch job, so an image gets the same vector
in both places.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.encoder.head import Head
from services.encoder.images import Preprocessing, decode

log = logging.getLogger(__name__)

FEATURES_OUTPUT = "features"
LOGITS_OUTPUT = "logits"
RUN_BATCH = 16  # images per backbone run: bounds the activations' memory of a 64-image call


class ImageEncoder:
    """Images -> backbone features; the head, when given, maps features to word space."""

    def __init__(
        self,
        backbone_path: str | Path,
        preprocessing: Preprocessing | dict,
        head_path: str | Path | None = None,
        threads: int = 0,
        decode_slots: threading.Semaphore | None = None,
    ):
        """`decode_slots` bounds how many images this process decodes at once (None: no bound)."""
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.preprocessing = preprocessing
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(backbone_path), options, providers=["CPUExecutionProvider"]
        )
        self.head = Head.load(Path(head_path)) if head_path else None
        self.decode_slots = decode_slots

    @property
    def feature_dimension(self) -> int:
        return int(self.session.get_outputs()[0].shape[1])

    def pixels(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> the preprocessed CHW array; ImageError for bad input."""
        with self.decode_slots or nullcontext():
            return self.preprocessing(decode(data, size_hint=self.preprocessing.size))

    def features_of_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.feature_dimension), np.float32)
        runs = [self.session.run([FEATURES_OUTPUT], {"pixels": pixels[start:start + RUN_BATCH]})[0]
                for start in range(0, len(pixels), RUN_BATCH)]
        return runs[0] if len(runs) == 1 else np.concatenate(runs)

    def features(self, images: list[bytes]) -> np.ndarray:
        return self.features_of_pixels(np.stack([self.pixels(data) for data in images]))

