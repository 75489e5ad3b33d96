"""make bench: every speed figure measured side by side in one run, written to BENCHMARKS.md.

    python -m bench.run --artifacts artifacts [--data DIR] [--out BENCHMARKS.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import ray

from bench import capacity, explain, extraction, head, knn, serving, tracing, web
from batch import backbones, word_vectors
from batch.extract import extract
from batch.images import labelled, list_images
from batch.quality import label_matrix
from batch.train import SHARED_CIFAR
from services.common import artifact

log = logging.getLogger(__name__)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, " \
           f"no GPU, Python {platform.python_version()}"


def run(args) -> dict:
    data = Path(args.data)
    cache = Path(args.cache)
    onnx_path = cache / "backbones" / "efficientnet-lite0.onnx"
    if not onnx_path.is_file():
        backbones.export_onnx("efficientnet-lite0", onnx_path)
    records = labelled(list_images(data))
    rng = np.random.default_rng(0)
    sample = [records[i] for i in sorted(rng.choice(len(records), min(len(records), args.images), replace=False))]
    results: dict = {}

    log.info("1/5 feature extraction on %d images", len(sample))
    results["extraction"] = extraction.bench(sample, onnx_path, torch_images=args.torch_images)

    log.info("2/5 head training")
    spec = backbones.spec("efficientnet-lite0")
    features = extract(records, "efficientnet-lite0", onnx_path, spec.preprocessing, cache / "features")
    x = np.stack([features.features[r.path] for r in records])
    names = sorted({r.label for r in records})
    words = word_vectors.load()
    y = np.asarray([names.index(r.label) for r in records])
    results["head"] = head.bench(x, y, label_matrix(names, words.index(), words.vectors, words.source),
                                 [Path(r.path).read_bytes() for r in sample[:64]], onnx_path)

    log.info("3/5 k-NN: GloVe words and image embeddings")
    queries = words.vectors[rng.choice(len(words.vectors), 1000, replace=False)]
    results["knn_words"] = knn.bench(words.vectors, queries)
    images = np.load(artifact.resolve(args.artifacts) / artifact.INDEXES / "images" / "vectors.npy")
    results["knn_images"] = knn.bench(images, images[rng.choice(len(images), min(1000, len(images)), replace=False)])

    log.info("4/5 serving")
    results["serving"] = serving.bench(args.artifacts, Path(sample[0].path), seconds=args.seconds)
    results["web"] = web.bench(args.artifacts, cache / "thumbnails", seconds=args.seconds)
    results["explain"] = explain.bench(args.artifacts, seconds=args.seconds, rounds=2)
    results["tracing"] = tracing.bench(args.artifacts, seconds=args.seconds, rounds=2)

    log.info("5/5 scale")
    results["scale"] = [capacity.measure_index(args.vectors, d) for d in (50, 300)]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--data", default=str(SHARED_CIFAR), help="labelled images (default: CIFAR-10 train)")
    parser.add_argument("--cache", default=os.environ.get("CACHE", ".cache"))
    parser.add_argument("--images", type=int, default=2048, help="images for the extraction comparison")
    parser.add_argument("--torch-images", type=int, default=256, help="of those, for the (slow) torch eager loop")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors for the scale runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--json", default="", help="also write the raw figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        results = run(args)
    finally:
        ray.shutdown()
    results["meta"] = {"machine": machine(), "command": command, "date": time.strftime("%Y-%m-%d"),
                       "seconds": round(time.perf_counter() - started)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    from bench.report import markdown

    Path(args.out).write_text(markdown(results))
    print(f"wrote {args.out} in {results['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
