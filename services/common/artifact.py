"""The artifact directory: what batch-train publishes and the services load.

Layout of one version (`ARTIFACTS/<version>/`, with `ARTIFACTS/current` pointing at the newest):

    manifest.json            versions, dimensions, counts, sha256 of every file
    backbone.onnx            ImageNet backbone: pixels -> (features, logits)
    head.npz                 the trained DeViSE head (BatchNorm folded in)
    modes.npz                the ImageNet classifier, class vectors and training centroids of the conse/hybrid/gated modes
    baselines/               the softmax baseline and the zero-shot head (the quality report's)
    indexes/<name>/          vectors.npy, items.jsonl, scann/ (serialized searcher)
    indexes/images/          also features.npy: each image's backbone features, unit length, float16,
                             in the rows of vectors.npy (near-duplicate search; absent in artifacts
                             built before it, which `make index` rebuilds); per shard when sharded
    report.json, report.md   training summary and the quality report on the validation split
    unreadable.txt           images that could not be read, with the reason

Beside the versions, `ARTIFACTS/live/` holds the live-update log (services/index/live.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
BACKBONE = "backbone.onnx"
HEAD = "head.npz"
INDEXES = "indexes"
FEATURES = "features.npy"  # beside an image index's vectors.npy
REPORT = "report.json"
UNREADABLE = "unreadable.txt"
CURRENT = "current"
FORMAT_VERSION = 3  # 2: modes.npz (the encoder modes) is part of every artifact; 3: gated centroids, query expansion


class ArtifactError(FileNotFoundError):
    """No usable artifact at the given path."""


def resolve(path: str | Path) -> Path:
    """An artifact version directory, or a root whose `current` link points at one -> the real version dir."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path.resolve()
    if (path / CURRENT / MANIFEST).is_file():
        return (path / CURRENT).resolve()
    raise ArtifactError(
        f"no artifact at {path}: expected {path / MANIFEST} or {path / CURRENT / MANIFEST} "
        "(run `make batch-train` first)"
    )


@dataclass(frozen=True)
class Backbone:
    """The ImageNet network that turns pixels into features (`backbone.onnx`)."""

    name: str
    weights: str  # "packaged", or the weights file batch-train was given
    feature_dimension: int
    preprocessing: dict  # services.encoder.images.Preprocessing.to_dict()

    @classmethod
    def from_dict(cls, data: dict) -> Backbone:
        return cls(data["name"], data["weights"], int(data["feature_dimension"]), dict(data["preprocessing"]))

    @property
    def identity(self) -> str:
        """Features made by backbones of one identity can be compared (near-duplicate search)."""
        return f"{self.name}:{self.weights}:{self.feature_dimension}"


@dataclass(frozen=True)
class WordSpace:
    """The word vectors the head maps into (`indexes/words/` holds them)."""

    source: str
    dimension: int
    vocabulary: int

    @classmethod
    def from_dict(cls, data: dict) -> WordSpace:
        return cls(data["source"], int(data["dimension"]), int(data["vocabulary"]))


@dataclass(frozen=True)
class HeadInfo:
    """How the head was trained: batch.train_head.HeadConfig's fields, and its validation figure."""

    config: dict  # HeadConfig's fields (epochs, loss, seed, ...); written flat beside validation_label_hit1
    validation_label_hit1: float

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def to_dict(self) -> dict:
        return {**self.config, "validation_label_hit1": self.validation_label_hit1}

    @classmethod
    def from_dict(cls, data: dict) -> HeadInfo:
        config = {k: v for k, v in data.items() if k != "validation_label_hit1"}
        return cls(config, float(data["validation_label_hit1"]))


@dataclass(frozen=True)
class QualityInfo:
    """The quality report's settings: the labels left out of the zero-shot head, and the validation split."""

    held_out: list[str]
    seed: int
    val_fraction: float

    @classmethod
    def from_dict(cls, data: dict) -> QualityInfo:
        return cls(list(data["held_out"]), int(data["seed"]), float(data["val_fraction"]))


@dataclass(frozen=True)
class DataInfo:
    """The folders batch-train read."""

    labelled: str
    searchable: str
    open_vocabulary: str | None

    @classmethod
    def from_dict(cls, data: dict) -> DataInfo:
        return cls(data["labelled"], data["searchable"], data.get("open_vocabulary"))


@dataclass(frozen=True)
class IndexInfo:
    """One index under `indexes/<name>/`: its size and the ScaNN configuration it was built with."""

    size: int
    dimension: int
    shards: int
    config: dict  # services.index.core's search configuration; written flat beside size, dimension, shards

    def to_dict(self) -> dict:
        return {"size": self.size, "dimension": self.dimension, "shards": self.shards, **self.config}

    @classmethod
    def from_dict(cls, data: dict) -> IndexInfo:
        config = {k: v for k, v in data.items() if k not in ("size", "dimension", "shards")}
        return cls(int(data["size"]), int(data["dimension"]), int(data["shards"]), config)


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what an artifact version holds. `version` and `files` are set when it is published.

    On disk it is the JSON of `to_dict()` plus `format_version`; `read_manifest` refuses another
    format and ignores keys it does not know.
    """

    created: str
    versions: dict[str, str]  # package versions of the batch job
    backbone: Backbone
    word_vectors: WordSpace
    dimension: int  # of the shared space: the word vectors' dimension
    labels: list[str]
    head: HeadInfo
    modes: dict  # services.encoder.modes.ModeParams.to_dict()
    quality: QualityInfo
    data: DataInfo
    indexes: dict[str, IndexInfo]
    version: str = ""
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every other file

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "version": self.version, "created": self.created,
            "versions": dict(self.versions), "backbone": asdict(self.backbone),
            "word_vectors": asdict(self.word_vectors), "dimension": self.dimension, "labels": list(self.labels),
            "head": self.head.to_dict(), "modes": self.modes, "quality": asdict(self.quality),
            "data": asdict(self.data), "indexes": {name: index.to_dict() for name, index in self.indexes.items()},
            "files": dict(self.files),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(
            created=data["created"], versions=dict(data["versions"]), backbone=Backbone.from_dict(data["backbone"]),
            word_vectors=WordSpace.from_dict(data["word_vectors"]), dimension=int(data["dimension"]),
            labels=list(data["labels"]), head=HeadInfo.from_dict(data["head"]), modes=dict(data["modes"]),
            quality=QualityInfo.from_dict(data["quality"]), data=DataInfo.from_dict(data["data"]),
            indexes={name: IndexInfo.from_dict(index) for name, index in data["indexes"].items()},
            version=data["version"], files=dict(data["files"]),
        )

    @property
    def space(self) -> str:
        """The word space the artifact's vectors live in; vectors from the same space can be mixed."""
        return f"{self.word_vectors.source}:{self.dimension}"


def read_manifest(version_dir: Path) -> Manifest:
    """The manifest of an artifact version; ArtifactError for another format or a manifest missing keys."""
    data = json.loads((version_dir / MANIFEST).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{version_dir}: artifact format {data.get('format_version')} is not {FORMAT_VERSION}; rerun batch-train"
        )
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{version_dir}: manifest lacks or mangles {error}; rerun batch-train") from error


def write_manifest(version_dir: Path, manifest: Manifest) -> Path:
    path = version_dir / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return path


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename or a new file in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
