"""Fallback default data: CIFAR-10 through torchvision's downloader, written as an ImageFolder."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_cifar10(root: Path, split: str = "train") -> Path:
    """`root/<split>/<class>/NNNN.jpg`, downloading CIFAR-10 once when the folder is absent."""
    target = root / split
    if target.is_dir() and any(target.iterdir()):
        return target
    import torchvision

    log.info("downloading CIFAR-10 (%s) into %s", split, root)
    dataset = torchvision.datasets.CIFAR10(str(root / "download"), train=split == "train", download=True)
    counts: dict[int, int] = {}
    for image, label in dataset:
        folder = target / dataset.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        counts[label] = counts.get(label, 0) + 1
        image.save(folder / f"{counts[label]:04d}.jpg", quality=95)
    return target
