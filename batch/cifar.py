"""Fallback default data: CIFAR-10 through torchvision's downloader, written as an ImageFolder."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_cifar10(root: Path, split: str = "train", per_class: int = 500) -> Path:
    """`root/<split>/<class>/NNNN.jpg` (the first `per_class` photos of each class, as in
    ../shared/data), downloading CIFAR-10 once when the folder is absent."""
    target = root / split
    if target.is_dir() and any(target.iterdir()):
        return target
    import torchvision

    log.info("downloading CIFAR-10 (%s) into %s", split, root)
    dataset = torchvision.datasets.CIFAR10(str(root / "download"), train=split == "train", download=True)
    counts: dict[int, int] = {}
    for image, label in dataset:
        if counts.get(label, 0) >= per_class:
            continue
        folder = target / dataset.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{counts.get(label, 0):04d}.jpg", quality=95)
        counts[label] = counts.get(label, 0) + 1
    return target
