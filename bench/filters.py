"""Filtered search inside the index: recall@10 against exact search over the matching rows, and time
per query beside the same index's unfiltered search, on real GloVe vectors (400,000 x 50, tree + AH).

    python -m bench.filters [--vectors 400000] [--queries 200]

Each row is labelled with one of ten labels at random; filters keep one label (10%), five (50%) and
one folder of 1,000 rows (0.25%, searched exactly).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from batch import word_vectors
from services.common.items import Item
from services.index.core import VectorIndex
from services.index.selection import Selection

K = 10
LABELS = tuple(f"label{i}" for i in range(10))


def _per_query_ms(index: VectorIndex, queries: np.ndarray, selection: Selection) -> tuple[list, float]:
    index.search(queries[0], K, selection=selection)  # the filter's rows are found once, then remembered
    started = time.perf_counter()
    found = [index.search(query, K, selection=selection) for query in queries]
    return found, (time.perf_counter() - started) / len(queries) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=400_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args(argv)
    words = word_vectors.load()
    vectors = words.vectors[:args.vectors]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(LABELS), len(vectors))
    ids = [f"f{row // 1000}/{word}" for row, word in enumerate(words.words[:len(vectors)])]
    index = VectorIndex.build("bench", vectors, [Item(i, label=LABELS[label]) for i, label in zip(ids, labels)])
    queries = vectors[rng.choice(len(vectors), args.queries, replace=False)]
    _, plain_ms = _per_query_ms(index, queries, Selection())
    print(f"{len(vectors):,} x {vectors.shape[1]} GloVe vectors, {index.config}, {args.queries} queries")
    print(f"unfiltered: {plain_ms:.2f} ms/query")
    print("| filter | keeps | recall@10 vs exact over the matching rows | ms/query | x unfiltered |")
    print("|---|---|---|---|---|")
    for name, selection in (("1 label", Selection(frozenset(LABELS[:1]))),
                            ("5 labels", Selection(frozenset(LABELS[:5]))),
                            ("1 folder", Selection(folder="f7/"))):
        rows = index.matching_rows(selection)
        found, ms = _per_query_ms(index, queries, selection)
        recall = np.mean([len({h.item.id for h in hits} & {ids[r] for r in rows[np.argsort(-(vectors[rows] @ q))[:K]]})
                          / K for q, hits in zip(queries, found)])
        print(f"| {name} | {len(rows) / len(vectors):.2%} | {recall:.3f} | {ms:.2f} | {ms / plain_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
