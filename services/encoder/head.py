"""The trained DeViSE head at serving time: numpy, BatchNorm folded into the first layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Head:
    """relu(x @ w1 + b1) @ w2 + b2, then L2-normalised: image features -> the word space."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @property
    def input_dimension(self) -> int:
        return int(self.w1.shape[0])

    @property
    def output_dimension(self) -> int:
        return int(self.w2.shape[1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        hidden = np.maximum(features @ self.w1 + self.b1, 0.0)
        out = hidden @ self.w2 + self.b2
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

    @classmethod
    def load(cls, path: Path) -> "Head":
        with np.load(path) as data:
            return cls(*(data[name].astype(np.float32) for name in ("w1", "b1", "w2", "b2")))
