"""The artifact directory: what batch-train publishes and the services load.

Layout of one version (`ARTIFACTS/<version>/`, with `ARTIFACTS/current` pointing at the newest):

    manifest.json            versions, dimensions, counts, sha256 of every file
    backbone.onnx            ImageNet backbone: pixels -> (features, logits)
    head.npz                 the trained DeViSE head (BatchNorm folded in)
    modes.npz                the ImageNet classifier, class vectors and training centroids of the conse/hybrid/gated modes
    baselines/               the softmax baseline and the zero-shot head (the quality report's)
    indexes/<name>/          vectors.npy, items.jsonl, scann/ (serialized searcher)
    report.json, report.md   training summary and the quality report on the validation split
    unreadable.txt           images that could not be read, with the reason

Beside the versions, `ARTIFACTS/live/` holds the live-update log (services/index/live.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
BACKBONE = "backbone.onnx"
HEAD = "head.npz"
INDEXES = "indexes"
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


def read_manifest(version_dir: Path) -> dict:
    manifest = json.loads((version_dir / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{version_dir}: artifact format {manifest.get('format_version')} is not {FORMAT_VERSION}; rerun batch-train"
        )
    return manifest


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename or a new file in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
