"""Evaluate an artifact on a labelled image folder: label hit@1 and tag hit@k over the whole vocabulary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from batch.images import labelled, list_images
from services.encoder.core import EncoderCore
from services.encoder.images import ImageError

log = logging.getLogger(__name__)


def evaluate(artifacts: str | Path, data: str | Path, batch_size: int = 64) -> dict:
    """Embed every labelled image of `data` with the artifact's encoder and score the answers."""
    encoder = EncoderCore(artifacts)
    records = labelled(list_images(data))
    labels = encoder.manifest["labels"]
    vectors, truths, unreadable = [], [], 0
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        pixels = []
        for record in records[start:start + batch_size]:
            try:
                pixels.append(encoder.images.pixels(Path(record.path).read_bytes()))
                truths.append(record.label)
            except (ImageError, OSError):
                unreadable += 1
        if pixels:
            vectors.extend(encoder.images.head(encoder.images.features_of_pixels(np.stack(pixels))))
        log.info("evaluated %d/%d images", min(start + batch_size, len(records)), len(records))
    vectors = np.stack(vectors)
    label_rows = [encoder.rows[label.lower()] for label in labels]
    flat = np.asarray(labels)[np.argmax(vectors @ encoder.word_vectors[label_rows].T, axis=1)]
    top = np.argsort(-(vectors @ encoder.word_vectors.T), axis=1)[:, :10]
    words = np.asarray(encoder.words)[top]
    truths_arr = np.asarray([t.lower() for t in truths])
    return {
        "artifact": encoder.version,
        "data": str(data),
        "images": len(truths),
        "unreadable": unreadable,
        "label_hit1": float(np.mean(flat == np.asarray(truths))),
        **{f"tag_hit{k}": float(np.mean([t in row[:k] for t, row in zip(truths_arr, words)])) for k in (1, 5, 10)},
        "vocabulary": len(encoder.words),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--data", required=True, help="labelled images, one sub-folder per label")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(evaluate(args.artifacts, args.data), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
