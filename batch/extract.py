"""Stage 1: backbone features for every image, with Ray Data, cached so a rerun skips what is done."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from batch.images import ImageRecord
from batch.progress import Progress
from services.encoder.image_encoder import ImageEncoder
from services.encoder.images import ImageError, Preprocessing

log = logging.getLogger(__name__)


@dataclass
class Extraction:
    features: dict[str, np.ndarray]  # image path -> feature row
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason
    extracted: int = 0  # computed in this run (the rest came from the cache)
    by_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> images extracted there
    seconds: float = 0.0


class FeatureExtractor(ImageEncoder):
    """The service's ImageEncoder as Ray Data's callable class: it loads the backbone once per actor."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"path", "key"} rows -> {"key", "features", "error", "node"}.

        An unreadable image yields a zero feature row and a non-empty `error`; it never
        fails the batch.
        """
        pixels, errors = [], []
        for path in batch["path"]:
            try:
                pixels.append(self.pixels(Path(path).read_bytes()))
                errors.append("")
            except (ImageError, OSError) as error:
                pixels.append(None)
                errors.append(str(error) or type(error).__name__)
        good = [p for p in pixels if p is not None]
        good_features = self.features_of_pixels(np.stack(good) if good else np.zeros((0,)))
        features = np.zeros((len(pixels), self.feature_dimension), np.float32)
        features[[i for i, p in enumerate(pixels) if p is not None]] = good_features
        node = np.asarray([ray_node_id()] * len(pixels), dtype=object)
        return {"key": batch["key"], "features": features, "error": np.asarray(errors, dtype=object), "node": node}


def ray_node_id() -> str:
    """The Ray node this batch ran on (empty outside Ray), so a job can show where its work went."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class FeatureCache:
    """Append-only part files of (keys, features) under one folder per backbone."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, np.ndarray]:
        cached: dict[str, np.ndarray] = {}
        for part in sorted(self.directory.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as data:
                    cached.update(zip(data["keys"].tolist(), data["features"]))
            except (OSError, ValueError, KeyError) as error:
                log.warning("ignoring damaged cache part %s: %s", part, error)
        return cached

    def append(self, keys: list[str], features: np.ndarray) -> None:
        final = self.directory / f"part-{uuid.uuid4().hex}.npz"
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            np.savez(handle, keys=np.asarray(keys, dtype=str), features=features.astype(np.float32))
        temporary.replace(final)


def extract(
    records: list[ImageRecord],
    backbone_name: str,
    backbone_path: Path,
    preprocessing: Preprocessing,
    cache_dir: Path,
    batch_size: int = 64,
    actors: int = 1,
    threads_per_actor: int = 2,
) -> Extraction:
    """Features for `records` (by image path); those not in the cache are computed by Ray Data and cached."""
    started = time.perf_counter()
    cache = FeatureCache(cache_dir / backbone_name)
    cached = cache.load()
    keys = {record.path: record.cache_key(backbone_name) for record in records}
    todo = [record for record in records if keys[record.path] not in cached]
    result = Extraction({r.path: cached[keys[r.path]] for r in records if keys[r.path] in cached})
    log.info("features: %d images, %d cached, %d to extract", len(records), len(result.features), len(todo))
    if todo:
        path_of_key = {keys[r.path]: r.path for r in todo}
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours (Progress) says it per image
        dataset = ray.data.from_items(
            [{"path": r.path, "key": keys[r.path]} for r in todo],
            override_num_blocks=max(1, min(len(todo) // batch_size, 200)),
        ).map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={
                "backbone_path": str(backbone_path),
                "preprocessing": preprocessing.to_dict(),
                "threads": threads_per_actor,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads_per_actor,
            batch_format="numpy",
        )
        with Progress(len(todo), "extracted", log) as progress:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                _take_batch(batch, path_of_key, cache, result)
                progress.update(len(batch["key"]))
        result.extracted = progress.done - len(result.unreadable)
    for path, reason in sorted(result.unreadable.items()):
        log.warning("unreadable image skipped: %s (%s)", path, reason)
    result.seconds = time.perf_counter() - started
    return result


def _take_batch(batch: dict[str, np.ndarray], path_of_key: dict[str, str], cache: FeatureCache,
                result: Extraction) -> None:
    """One extracted batch: good rows into the cache and the result, unreadable images noted."""
    errors = batch["error"].astype(str)
    good = errors == ""
    batch_keys = batch["key"].astype(str)
    if good.any():
        cache.append(batch_keys[good].tolist(), batch["features"][good])
        result.features.update((path_of_key[key], row) for key, row in
                               zip(batch_keys[good].tolist(), batch["features"][good]))
    for key, error in zip(batch_keys[~good], errors[~good]):
        result.unreadable[path_of_key[key]] = error
    for node, count in zip(*np.unique(batch["node"].astype(str), return_counts=True)):
        result.by_node[node] = result.by_node.get(node, 0) + int(count)
