"""make index on a folder that changed a little, against a full run: images made searchable per second.

    python -m bench.reindex [--artifacts artifacts] [--data ../shared/data/imagenet200] [--changed 0.02]

The folder is copied to a temporary one; the first run starts from an empty feature cache (every image
extracted), then `--changed` of the files are rewritten (their bytes kept, their modification time
moved, so the cache sees them as changed) and the second run extracts only those. Both publish into a
temporary artifact root beside a copy of the current artifact, so the real one is left alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from batch import reindex
from batch.images import list_images
from services.common import artifact

REPO = Path(__file__).resolve().parents[1]


def _artifact_copy(artifacts: Path, root: Path) -> None:
    current = artifact.resolve(artifacts)
    reindex.link_or_copy_tree(current, root / current.name, leave_out=current / "no such folder")
    shutil.copy2(current / artifact.MANIFEST, root / current.name / artifact.MANIFEST)
    os.symlink(current.name, root / artifact.CURRENT)


def _run(root: Path, folder: Path, cache: Path) -> dict:
    started = time.perf_counter()
    version = reindex.run(root, folder, cache)
    seconds = time.perf_counter() - started
    images = json.loads((version / artifact.REPORT).read_text())["images"]
    return {"seconds": round(seconds, 1), "searchable": images["searchable"], "extracted_now": images["extracted_now"],
            "images_per_second": round(images["searchable"] / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/imagenet200")
    parser.add_argument("--changed", type=float, default=0.02)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        folder, root, cache = work / "photos", work / "artifacts", work / "cache"
        shutil.copytree(args.data, folder)
        _artifact_copy(args.artifacts, root)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            full = _run(root, folder, cache)
            records = list_images(folder)
            chosen = np.random.default_rng(0).choice(len(records), max(1, round(len(records) * args.changed)),
                                                     replace=False)
            for row in chosen:
                path = Path(records[row].path)
                stat = path.stat()
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
            again = _run(root, folder, cache)
        finally:
            ray.shutdown()
    print(json.dumps({"full": full, "changed": len(chosen), "rerun": again,
                      "speedup": round(again["images_per_second"] / full["images_per_second"], 1)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
