"""ScaNN build and search settings against FAISS HNSW on GloVe 6B 50d (400,000 words), in one run.

    python -m bench.scann_tuning [--dimension D]

The same 1,000 queries (random words) and exact neighbours for every method. FAISS HNSW (M=32, efConstruction
200) takes the smallest efSearch reaching recall@10 0.95; each ScaNN build is searched over a grid of
leaves-to-search and reorder depths, and the fastest setting at recall@10 >= 0.95 is printed, single queries
(one thread) and batched (2 threads) separately. `--dimension` maps the vectors to D dimensions by a random
orthogonal map (same neighbours, another cost per dot product), as no larger word-vector set ships offline.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from batch import word_vectors
from bench.knn import K, TARGET_RECALL, _recall, exact_neighbours


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def single_qps(search, queries: np.ndarray, repeats: int = 2) -> float:
    return max(len(queries) / timed(lambda: [search(q) for q in queries])[1] for _ in range(repeats))


def configs():
    from scann.scann_ops.py.scann_builder import ReorderType
    return [
        dict(name="index service tree (2 sqrt(n) leaves)", leaves=None),
        dict(name="spherical, quantized centroids, 2 sqrt(n) leaves", leaves=None, spherical=True, quantize_centroids=True),
        dict(name="spherical, 2,000 leaves", leaves=2000, spherical=True),
        dict(name="spherical, 2,000 leaves, SOAR (lambda 1, overretrieve 2)", leaves=2000, spherical=True, soar_lambda=1.0,
             overretrieve_factor=2.0),
        dict(name="spherical, 4,000 leaves", leaves=4000, spherical=True),
        dict(name="spherical, 2,000 leaves, int8 reorder", leaves=2000, spherical=True, reorder=ReorderType.INT8),
    ]


def faiss_row(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> str:
    import faiss
    faiss.omp_set_num_threads(2)
    graph = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 200
    _, build = timed(lambda: graph.add(vectors))
    for ef in (10, 12, 16, 20, 24, 32, 48, 64):
        graph.hnsw.efSearch = ef
        faiss.omp_set_num_threads(2)
        found, batched = timed(lambda: graph.search(queries, K)[1])
        recall = _recall(found, exact)
        if recall >= TARGET_RECALL:
            break
    faiss.omp_set_num_threads(1)
    single = single_qps(lambda q: graph.search(q[None], K), queries)
    return (f"| FAISS HNSW (M=32, efC=200) | efSearch {ef} | {recall:.3f} | {single:,.0f} | {len(queries) / batched:,.0f} "
            f"| {build:.1f} |")


def scann_row(config: dict, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> str:
    import scann
    from scann.scann_ops.py.scann_builder import ReorderType
    leaves = config["leaves"] or int(2 * np.sqrt(len(vectors)))
    tree = {k: config[k] for k in ("spherical", "quantize_centroids", "soar_lambda", "overretrieve_factor") if k in config}

    def build():
        builder = scann.scann_ops_pybind.builder(vectors, K, "dot_product").tree(
            num_leaves=leaves, num_leaves_to_search=leaves // 20, training_sample_size=min(len(vectors), 250_000), **tree)
        return builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(
            250, config.get("reorder", ReorderType.FLOAT32)).build()

    searcher, build_s = timed(build)
    single, batched = None, None
    for fraction, reorder in itertools.product((80, 60, 40, 30, 20, 15, 10), (30, 50, 100, 150)):
        search = dict(final_num_neighbors=K, leaves_to_search=max(1, leaves // fraction), pre_reorder_num_neighbors=reorder)
        found, seconds = timed(lambda: searcher.search_batched_parallel(queries, **search)[0])
        recall = _recall(found, exact)
        if recall < TARGET_RECALL:
            continue
        qps = single_qps(lambda q: searcher.search(q, **search), queries)
        setting = f"leaves {search['leaves_to_search']}/{leaves}, reorder {reorder}"
        if single is None or qps > single[0]:
            single = (qps, setting, recall)
        if batched is None or len(queries) / seconds > batched[0]:
            batched = (len(queries) / seconds, setting, recall)
    if single is None:
        return f"| ScaNN: {config['name']} | no setting reached {TARGET_RECALL} | | | | {build_s:.1f} |"
    return (f"| ScaNN: {config['name']} | single: {single[1]}; batched: {batched[1]} | {single[2]:.3f} / {batched[2]:.3f} "
            f"| {single[0]:,.0f} | {batched[0]:,.0f} | {build_s:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimension", type=int, default=0, help="map the vectors to this many dimensions first")
    args = parser.parse_args(argv)
    vectors = np.ascontiguousarray(word_vectors.load(word_vectors.PACKAGED).vectors, dtype=np.float32)
    if args.dimension:
        basis, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((args.dimension, vectors.shape[1])).astype(np.float32))
        vectors = np.ascontiguousarray(vectors @ basis.T)
    queries = vectors[np.random.default_rng(0).choice(len(vectors), 1000, replace=False)]
    exact, _ = exact_neighbours(vectors, queries)
    print(f"{len(vectors):,} vectors of {vectors.shape[1]} dimensions; 1,000 queries; fastest setting at recall@10 >= "
          f"{TARGET_RECALL}\n")
    print("| method | setting | recall@10 | QPS single (1 thread) | QPS batched (2 threads) | build s |")
    print("|---|---|---|---|---|---|")
    print(faiss_row(vectors, queries, exact), flush=True)
    for config in configs():
        print(scann_row(config, vectors, queries, exact), flush=True)


if __name__ == "__main__":
    main()
