"""Head training: seconds per epoch on cached features, against recomputing the backbone each epoch
(the tutorial's way), and Ray Train's fixed cost per fit."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from batch import backbones
from batch.train_head import HeadConfig, build_module, head_loss, split, train_head
from services.encoder.image_encoder import ImageEncoder


def _epoch(module, optimizer, features, labels, label_vectors, batch_size=256) -> None:
    module.train()
    order = torch.randperm(len(features))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        loss = head_loss(module(features[rows]), labels[rows], label_vectors, "cosine", 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def bench(features: np.ndarray, labels: np.ndarray, label_vectors: np.ndarray, sample: list[bytes],
          onnx_path: Path, backbone: str = "efficientnet-lite0", epochs: int = 3) -> dict:
    torch.set_num_threads(2)
    x, y, targets = torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(label_vectors)
    module = build_module(x.shape[1], targets.shape[1], 0.3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    _epoch(module, optimizer, x, y, targets)  # warm-up
    started = time.perf_counter()
    for _ in range(epochs):
        _epoch(module, optimizer, x, y, targets)
    cached_epoch = (time.perf_counter() - started) / epochs

    spec = backbones.spec(backbone)
    encoder = ImageEncoder(onnx_path, spec.preprocessing)
    eager = spec.build(None)
    with torch.no_grad():
        started = time.perf_counter()
        eager(torch.from_numpy(np.stack([encoder.pixels(d) for d in sample])))
        per_image = (time.perf_counter() - started) / len(sample)
    recompute_epoch = cached_epoch + per_image * len(features)

    train_rows, val_rows = split(labels, 0.1, 0)
    with tempfile.TemporaryDirectory() as storage:
        one = train_head(features, labels, label_vectors, train_rows, val_rows, HeadConfig(epochs=1), Path(storage))
        six = train_head(features, labels, label_vectors, train_rows, val_rows, HeadConfig(epochs=6), Path(storage))
    per_epoch_ray = (six.seconds - one.seconds) / 5
    return {
        "images": len(features), "cached_epoch_s": round(cached_epoch, 3),
        "recompute_epoch_s": round(recompute_epoch, 1), "torch_eager_backbone_ms_per_image": round(per_image * 1000, 1),
        "speedup": round(recompute_epoch / cached_epoch),
        "ray_train_fixed_s": round(one.seconds - per_epoch_ray, 1), "ray_train_epoch_s": round(per_epoch_ray, 2),
    }
