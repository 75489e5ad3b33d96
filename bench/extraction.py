"""Feature extraction on the same images and batch size: torch eager, bare ONNX Runtime, and the
Ray Data pipeline of batch/ (with its costs split into decode/resize and model time)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from batch import backbones
from batch.extract import extract
from batch.images import ImageRecord
from services.encoder.image_encoder import ImageEncoder


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def bench(records: list[ImageRecord], onnx_path: Path, backbone: str = "efficientnet-lite0",
          batch_size: int = 64, torch_images: int = 256, threads: int = 2) -> dict:
    import torch

    spec = backbones.spec(backbone)
    encoder = ImageEncoder(onnx_path, spec.preprocessing, threads=threads)
    data = [Path(r.path).read_bytes() for r in records]
    batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    encoder.features(batches[0])  # warm-up

    started = time.perf_counter()
    pixels = [np.stack([encoder.pixels(d) for d in batch]) for batch in batches]
    decode = time.perf_counter() - started
    started = time.perf_counter()
    for batch in pixels:
        encoder.features_of_pixels(batch)
    model = time.perf_counter() - started
    started = time.perf_counter()
    for batch in batches:
        encoder.features(batch)
    onnx_loop = time.perf_counter() - started

    torch.set_num_threads(threads)
    module = spec.build(None)
    torch_batches = batches[: max(1, torch_images // batch_size)]
    with torch.no_grad():
        module(torch.from_numpy(pixels[0][:8]))  # warm-up
        started = time.perf_counter()
        for batch in torch_batches:
            module(torch.from_numpy(np.stack([encoder.pixels(d) for d in batch])))
        torch_loop = time.perf_counter() - started
    torch_count = sum(len(b) for b in torch_batches)

    pipelines = {}
    for actors, per_actor in ((1, threads), (threads, 1)):
        with tempfile.TemporaryDirectory() as cache:
            result = extract(records, backbone, onnx_path, spec.preprocessing, Path(cache), batch_size, actors, per_actor)
        pipelines[f"{actors} actor(s) x {per_actor} thread(s)"] = _rate(len(records), result.seconds)
    onnx_rate = _rate(len(data), onnx_loop)
    best = max(pipelines.values())
    return {
        "images": len(data), "torch_images": torch_count, "batch_size": batch_size, "threads": threads,
        "torch_eager": _rate(torch_count, torch_loop), "onnx_runtime": onnx_rate,
        "decode_resize_only": _rate(len(data), decode), "onnx_model_only": _rate(len(data), model),
        "ray_pipeline": pipelines, "ray_vs_onnx": round(best / onnx_rate, 2),
        "ray_vs_torch": round(best / _rate(torch_count, torch_loop), 2),
        "onnx_vs_torch": round(onnx_rate / _rate(torch_count, torch_loop), 2),
    }
