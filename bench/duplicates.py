"""Near-duplicates: pair precision and recall per threshold on copies of real photos (batch/duplicate_copies.py).

    python -m bench.duplicates [--half validation] [--artifacts artifacts] [--cache .cache]
    python -m bench.duplicates --scale 10000 20000     # seconds to group N random 1,280-d features

The collection is imagenet200 (1,000 real photos) and CIFAR-10 test (1,000), plus three copies
(resized, recompressed, cropped) of two photos of each category of one half of imagenet200: the
validation half chooses the default threshold; the test half is what tests/test_duplicates.py
checks (with other crop offsets). Features come from the artifact's backbone through the feature
cache, so a rerun extracts only what is new. Prints a table per threshold, for connected components
(what the service returns) and for the pairs alone (no chaining), and the rule's choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from batch import duplicate_copies
from batch.extract import extract
from batch.images import ImageRecord, list_images
from batch.open_vocab import SHARED_OPEN_DATA
from batch.train import run_job
from services.common import artifact
from services.encoder.images import Preprocessing
from services.gateway import duplicates

THRESHOLDS = [round(0.80 + 0.01 * step, 2) for step in range(19)]
MIN_PRECISION = 0.99  # the rule: the lowest threshold whose pair precision on validation is at least this
SEEDS = {"validation": 0, "test": 1}
SHARED_CIFAR_TEST = SHARED_OPEN_DATA.parent / "cifar10" / "test"


def collection(real: Path, cifar: Path, copies_dir: Path, half: str, seed: int
               ) -> tuple[list[ImageRecord], list[duplicate_copies.Copy]]:
    """The real photos (`imagenet200/...`), the CIFAR photos (`cifar10/...`) and the copies (`copies/...`).
    Copies are written once (a rerun finds their features in the cache)."""
    photos = [replace(r, id=f"imagenet200/{r.id}") for r in list_images(real)]
    photos += [replace(r, id=f"cifar10/{r.id}") for r in list_images(cifar)]
    by_path = {r.path: r for r in photos}
    originals = [by_path[r.path] for r in duplicate_copies.sources(real, half)]
    made = duplicate_copies.planned_copies(originals, copies_dir)
    if not all(Path(c.record.path).is_file() for c in made):
        made = duplicate_copies.make_copies(originals, copies_dir, seed)
    return photos + [c.record for c in made], made


def compared_features(records: list[ImageRecord], artifacts: Path, cache: Path) -> np.ndarray:
    current = artifact.resolve(artifacts)
    manifest = artifact.read_manifest(current)
    found = extract(records, manifest.backbone.name, current / artifact.BACKBONE,
                    Preprocessing.from_dict(manifest.backbone.preprocessing), cache / "features", actors=2)
    if found.unreadable:
        raise ValueError(f"unreadable photos: {sorted(found.unreadable)[:5]}")
    features = np.stack([found.features[r.path] for r in records]).astype(np.float32)
    return duplicates.root_features(features / np.linalg.norm(features, axis=1, keepdims=True))


def connected_components(n: int, firsts: np.ndarray, seconds: np.ndarray) -> list[list[int]]:
    """The rule the service does not use, for comparison: every pair at the threshold joins its groups."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(firsts.tolist(), seconds.tolist()):
        parent[max(root(a), root(b))] = min(root(a), root(b))
    members: dict[int, list[int]] = {}
    for row in sorted(set(firsts.tolist()) | set(seconds.tolist())):
        members.setdefault(root(row), []).append(row)
    return list(members.values())


def sweep(features: np.ndarray, ids: list[str], truth: set) -> list[dict]:
    """Per threshold: the service's groups (average linkage), connected components and the pairs alone."""
    rows = []
    for threshold in THRESHOLDS:
        started = time.perf_counter()
        groups = duplicates.near_duplicate_groups(features, threshold)
        seconds = time.perf_counter() - started
        first, second, _ = duplicates.similar_pairs(features, threshold)
        named = lambda found: [[ids[r] for r in group] for group in found]  # noqa: E731
        rows.append({"threshold": threshold, "seconds": round(seconds, 2),
                     "average_linkage": duplicate_copies.pair_scores(named(g.rows for g in groups), truth),
                     "components": duplicate_copies.pair_scores(
                         named(connected_components(len(ids), first, second)), truth),
                     "pairs": duplicate_copies.pair_scores(named(zip(first.tolist(), second.tolist())), truth)})
    return rows


def per_kind(features: np.ndarray, ids: list[str], made: list[duplicate_copies.Copy], threshold: float) -> dict:
    """For each kind of copy: the share put in its source's group, and its similarity to the source."""
    row = {item_id: n for n, item_id in enumerate(ids)}
    group_of = {r: number for number, g in enumerate(duplicates.near_duplicate_groups(features, threshold)) for r in g.rows}
    found = {}
    for kind in duplicate_copies.KINDS:
        mine = [(row[c.record.id], row[c.source_id]) for c in made if c.kind == kind]
        similarity = [float(features[a].astype(np.float32) @ features[b].astype(np.float32)) for a, b in mine]
        grouped = [a in group_of and group_of.get(a) == group_of.get(b) for a, b in mine]
        found[kind] = {"with_source": float(np.mean(grouped)), "min": min(similarity), "median": float(np.median(similarity))}
    return found


def unrelated(features: np.ndarray, ids: list[str], made: list[duplicate_copies.Copy]) -> dict:
    """Similarities of pairs of different collection photos (the copies left out): median, 99th percentile
    and the closest five pairs."""
    copies = {c.record.id for c in made}
    rows = [n for n, item_id in enumerate(ids) if item_id not in copies]
    block = features[rows].astype(np.float32)
    scores = block @ block.T
    first, second = np.triu_indices(len(rows), 1)
    values = scores[first, second]
    closest = np.argsort(-values)[:5]
    return {"pairs": len(values), "median": float(np.median(values)), "p99": float(np.quantile(values, 0.99)),
            "closest": [(ids[rows[first[c]]], ids[rows[second[c]]], round(float(values[c]), 3)) for c in closest]}


def chained(features: np.ndarray, ids: list[str], truth: set, threshold: float) -> list[dict]:
    """Connected components' groups with wrong pairs at `threshold`: their ids and wrong pairs."""
    first, second, _ = duplicates.similar_pairs(features, threshold)
    found = []
    for group in connected_components(len(ids), first, second):
        named = [ids[r] for r in group]
        wrong = duplicate_copies.predicted_pairs([named]) - truth
        if wrong:
            found.append({"ids": named, "wrong_pairs": len(wrong)})
    return found


def report(args) -> dict:
    records, made = collection(Path(args.real), Path(args.cifar), Path(args.cache) / "duplicates" / args.half / "copies",
                               args.half, SEEDS[args.half])
    features = compared_features(records, Path(args.artifacts), Path(args.cache))
    ids = [r.id for r in records]
    rows = sweep(features, ids, duplicate_copies.true_pairs(made))
    default = duplicates.default_threshold(artifact.read_manifest(artifact.resolve(Path(args.artifacts))).backbone.name)
    chosen = next((r["threshold"] for r in rows if r["average_linkage"]["precision"] >= MIN_PRECISION), THRESHOLDS[-1])
    return {"half": args.half, "images": len(records), "copies": len(made), "sweep": rows, "chosen": chosen,
            "rule": f"the lowest threshold whose pair precision (the service's groups) is >= {MIN_PRECISION}",
            "per_kind_at_chosen": per_kind(features, ids, made, chosen),
            "per_kind_at_default": per_kind(features, ids, made, default),
            "default": default, "unrelated": unrelated(features, ids, made),
            "components_wrong_at_chosen": chained(features, ids, duplicate_copies.true_pairs(made), chosen)}


def table(result: dict) -> str:
    lines = [f"{result['images']} images ({result['copies']} copies, {result['half']} half); "
             f"{result['sweep'][0]['pairs']['true_pairs']} true pairs",
             "| threshold | precision | recall | groups | seconds | connected components: precision, recall | "
             "pairs alone: precision, recall |", "|---|---|---|---|---|---|---|"]
    for row in result["sweep"]:
        a, c, p = row["average_linkage"], row["components"], row["pairs"]
        lines.append(f"| {row['threshold']:.2f} | {a['precision']:.3f} | {a['recall']:.3f} | {a['groups']} | "
                     f"{row['seconds']} | {c['precision']:.3f}, {c['recall']:.3f} | {p['precision']:.3f}, {p['recall']:.3f} |")
    lines.append(f"chosen by the rule ({result['rule']}): {result['chosen']:.2f}; the service's default: "
                 f"{result['default']:.2f}")
    for group in result["components_wrong_at_chosen"]:
        lines.append(f"connected components at {result['chosen']:.2f}: a group with {group['wrong_pairs']} wrong pair(s): "
                     + ", ".join(group["ids"]))
    far = result["unrelated"]
    lines.append(f"pairs of different collection photos ({far['pairs']:,}): similarity median {far['median']:.3f}, "
                 f"99th percentile {far['p99']:.3f}; closest: " + "; ".join(f"{a} ~ {b} {v}" for a, b, v in far["closest"]))
    for name in ("per_kind_at_chosen", "per_kind_at_default"):
        lines.append(f"{name}: " + ", ".join(f"{kind} {v['with_source']:.3f} in its source's group (similarity to it: "
                                             f"min {v['min']:.3f}, median {v['median']:.3f})"
                                             for kind, v in result[name].items()))
    return "\n".join(lines)


def scale(sizes: list[int]) -> list[dict]:
    """Seconds near_duplicate_groups takes over `sizes` random non-negative unit features of 1,280 values
    (no pair near the threshold: the cost of comparing every pair)."""
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        features = np.abs(rng.standard_normal((size, 1280), dtype=np.float32))
        features = (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float16)
        started, cpu = time.perf_counter(), time.process_time()
        duplicates.near_duplicate_groups(features)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        rows.append({"images": size, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                     "cpu_seconds_100k_by_n2": round(cpu * (100_000 / size) ** 2)})
        print(f"{size:,} images: {seconds:.1f} s, {cpu:.1f} CPU s (all threads; times (100,000 / n)^2: "
              f"{rows[-1]['cpu_seconds_100k_by_n2']} CPU s for 100,000)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=sorted(SEEDS), default="validation")
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--cache", default=os.environ.get("CACHE", ".cache"))
    parser.add_argument("--real", default=str(SHARED_OPEN_DATA))
    parser.add_argument("--cifar", default=str(SHARED_CIFAR_TEST))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--scale", type=int, nargs="+", help="only time the grouping of this many random features")
    args = parser.parse_args(argv)
    if args.scale:
        scale(args.scale)
        return 0

    def job() -> None:
        result = report(args)
        print(table(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
