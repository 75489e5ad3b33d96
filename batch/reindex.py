"""make index: make a folder searchable with the current artifact's model, without training.

The folder is listed (at any depth; the live log folded in, as batch-train does), features come from
the feature cache and only new or changed files are extracted (Ray Data), every image is embedded in
the artifact's default mode, and a new artifact version is published: the same model files and word
index (hard links where the file system allows, else copies) beside a new image index, which keeps the
images' backbone features too (near-duplicate search). Files that disappeared from the folder are no
longer in it. Running services switch to the new version without a restart. report.json says how many
images were extracted and how many came from the cache.

`--watch DIR` keeps a folder in step with the running services instead (services/gateway/watch.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from batch.build_index import build_image_index
from batch.extract import Extraction, extract
from batch.images import ImageRecord, list_images
from batch.publish import link_or_copy, new_staging, publish
from batch.train import run_job, with_live_updates
from services.common import artifact
from services.gateway import watch
from services.encoder.head import Head
from services.encoder.images import Preprocessing
from services.encoder.modes import FILE as MODES_FILE, ModeParams, Modes

log = logging.getLogger(__name__)

NEW_FOR_EACH_VERSION = {artifact.MANIFEST, artifact.REPORT, artifact.UNREADABLE}


def link_or_copy_tree(source: Path, target: Path, leave_out: Path) -> None:
    """Every file of `source` under `target` (hard links where possible), without the `leave_out` folder
    and the files each version writes anew."""
    for directory, subdirs, files in os.walk(source):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if here / d != leave_out]
        for name in files:
            if here == source and name in NEW_FOR_EACH_VERSION:
                continue
            link_or_copy(here / name, target / (here / name).relative_to(source))


def run(artifacts: Path, index_data: Path, cache: Path, batch_size: int = 64, threads_per_actor: int = 1) -> Path:
    """Publish a version of the current artifact whose image index holds the images of `index_data`."""
    started = time.perf_counter()
    current = artifact.resolve(artifacts)
    manifest = artifact.read_manifest(current)
    records, live_changes = with_live_updates(list_images(index_data), artifacts)
    if not records:
        raise ValueError(f"{index_data}: no images to make searchable")
    actors = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_actor)
    extraction = extract(records, manifest.backbone.name, current / artifact.BACKBONE,
                         Preprocessing.from_dict(manifest.backbone.preprocessing), cache / "features", batch_size,
                         actors, threads_per_actor)
    return publish_images(artifacts, records, extraction, str(index_data), live_changes, started)


def publish_images(artifacts: Path, records: list[ImageRecord], extraction: Extraction, searchable: str,
                   live_changes: dict | None = None, started: float | None = None) -> Path:
    """Publish a version of the current artifact whose image index holds the readable `records`, embedded
    (and their backbone features kept) from `extraction`; `searchable` is what the manifest says was indexed."""
    started = time.perf_counter() if started is None else started
    current = artifact.resolve(artifacts)
    manifest = artifact.read_manifest(current)
    readable = [r for r in records if r.path in extraction.features]
    if not readable:
        raise ValueError(f"{searchable}: no readable images to make searchable")
    modes = Modes.load(current / MODES_FILE, Head.load(current / artifact.HEAD), ModeParams.from_dict(manifest.modes))
    features = np.stack([extraction.features[r.path] for r in readable])
    vectors = modes.embed(features)
    staging = new_staging(artifacts)
    try:
        link_or_copy_tree(current, staging, leave_out=current / artifact.INDEXES / "images")
        images = build_image_index(staging, vectors, readable, manifest.indexes["images"].shards, features)
        (staging / artifact.UNREADABLE).write_text("".join(f"{p}\t{e}\n" for p, e in sorted(extraction.unreadable.items())))
        report = {"images": {"searchable": len(readable), "extracted_now": extraction.extracted,
                             "from_cache": len(records) - extraction.extracted - len(extraction.unreadable),
                             "unreadable": len(extraction.unreadable), "live_updates": live_changes or {}},
                  "model_of": manifest.version, "mode": modes.params.default,
                  "seconds": {"extract": round(extraction.seconds, 1), "total": round(time.perf_counter() - started, 1)}}
        (staging / artifact.REPORT).write_text(json.dumps(report, indent=2))
        version = publish(staging, artifacts, replace(
            manifest, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            data=replace(manifest.data, searchable=searchable), indexes={**manifest.indexes, "images": images}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = report["images"]
    print(f"\nindex done in {report['seconds']['total']:.0f} s -> {version} (the model of {manifest.version})\n"
          f"  images: {counts['searchable']} searchable, {counts['extracted_now']} extracted now, "
          f"{counts['from_cache']} from cache, {counts['unreadable']} unreadable", flush=True)
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--index-data", type=Path, help="the folder to make searchable")
    which.add_argument("--watch", type=Path, metavar="DIR",
                       help="keep DIR in step with the running services instead: photos copied in, changed or removed "
                            "are added, replaced or deleted live through the gateway (services/gateway/watch.py)")
    parser.add_argument("--artifacts", type=Path, default=Path(os.environ.get("ARTIFACTS", "artifacts")))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("CACHE", ".cache")))
    watch.add_watch_arguments(parser)
    args = parser.parse_args(argv)
    if args.watch:
        return watch.watch(args.watch, args)
    return run_job(lambda: run(args.artifacts, args.index_data, args.cache))

if __name__ == "__main__":
    sys.exit(main())
