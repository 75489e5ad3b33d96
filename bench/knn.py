"""k-NN on real vectors: ScaNN as the index service configures it, against numpy brute force,
hnswlib and FAISS (Flat and HNSW), on the same queries: recall@10, QPS, build time, memory."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from services.common.items import Item
from services.index.core import VectorIndex

K = 10
TARGET_RECALL = 0.95


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)]))


def _timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """numpy brute force, batched: the ground truth and its time."""
    def run():
        out = []
        for start in range(0, len(queries), 100):
            scores = queries[start:start + 100] @ vectors.T
            top = np.argpartition(-scores, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
            out.append(np.take_along_axis(top, order, 1))
        return np.concatenate(out)
    return _timed(run)


def _row(method, build_s, single, batched, recall, memory, queries, setting=""):
    return {"method": method, "setting": setting, "build_s": round(build_s, 1), "recall_at_10": round(recall, 3),
            "qps_single": round(queries / single), "qps_batched": round(queries / batched),
            "index_mb": round(memory / 1e6)}


def _sweep(name, build_s, size, queries, exact, settings, search_single, search_batched):
    """Try settings from cheapest up; keep the first that reaches the target recall (else the last)."""
    for setting in settings:
        found, batched = _timed(lambda s=setting: search_batched(s))
        recall = _recall(found, exact)
        if recall >= TARGET_RECALL or setting == settings[-1]:
            _, single = _timed(lambda s=setting: [search_single(s, q) for q in queries])
            return _row(name, build_s, single, batched, recall, size, len(queries), setting)


def bench(vectors: np.ndarray, queries: np.ndarray, threads: int = 2) -> list[dict]:
    import faiss
    import hnswlib

    exact, brute_batched = exact_neighbours(vectors, queries)
    _, brute_single = _timed(lambda: [np.argpartition(-(vectors @ q), K)[:K] for q in queries])
    rows = [_row("numpy brute force", 0, brute_single, brute_batched, 1.0, vectors.nbytes, len(queries))]


    index, build = _timed(lambda: VectorIndex.build("bench", vectors, [Item(str(i)) for i in range(len(vectors))]))
    searcher, config = index.searcher, index.config
    with tempfile.TemporaryDirectory() as folder:
        searcher.serialize(folder)
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
    if config.method == "brute_force":
        found, batched_s = _timed(lambda: searcher.search_batched_parallel(queries, final_num_neighbors=K)[0])
        _, single_s = _timed(lambda: [searcher.search(q, final_num_neighbors=K) for q in queries])
        rows.append(_row("ScaNN (index service config)", build, single_s, batched_s, _recall(found, exact), size,
                         len(queries), "brute force"))
    else:
        def scann_single(setting, q):
            leaves, reorder = setting
            return searcher.search(q, final_num_neighbors=K, pre_reorder_num_neighbors=reorder,
                                   leaves_to_search=leaves)[0]

        def scann_batched(setting):
            leaves, reorder = setting
            return searcher.search_batched_parallel(queries, final_num_neighbors=K, leaves_to_search=leaves,
                                                    pre_reorder_num_neighbors=reorder)[0]

        n = config.num_leaves
        settings = [(n // 40, 100), (n // 20, 100), (n // 20, 250), (config.leaves_to_search, config.reorder)]
        rows.append(_sweep("ScaNN (tree + AH + reorder)", build, size, queries, exact, settings, scann_single,
                           scann_batched))
        leaves, reorder = rows[-1]["setting"]
        rows[-1]["setting"] = f"leaves {leaves}/{n}, reorder {reorder}"
        service = (config.leaves_to_search, config.reorder)
        found, batched_s = _timed(lambda: scann_batched(service))
        _, single_s = _timed(lambda: [scann_single(service, q) for q in queries])
        rows.append(_row("ScaNN (index service config)", build, single_s, batched_s, _recall(found, exact), size,
                         len(queries), f"leaves {config.leaves_to_search}/{config.num_leaves}, reorder {config.reorder}"))

    hnsw = hnswlib.Index(space="ip", dim=vectors.shape[1])

    def build_hnsw():
        hnsw.init_index(max_elements=len(vectors), ef_construction=200, M=16)
        hnsw.add_items(vectors, num_threads=threads)
    _, build = _timed(build_hnsw)
    with tempfile.TemporaryDirectory() as folder:
        hnsw.save_index(f"{folder}/index.bin")
        size = Path(f"{folder}/index.bin").stat().st_size

    def hnsw_batched(ef):
        hnsw.set_ef(ef)
        return hnsw.knn_query(queries, k=K, num_threads=threads)[0]

    def hnsw_single(ef, q):
        return hnsw.knn_query(q, k=K, num_threads=1)[0]

    rows.append(_sweep("hnswlib (M=16, efC=200)", build, size, queries, exact, [10, 20, 40, 80, 160, 320],
                       hnsw_single, hnsw_batched))
    rows[-1]["setting"] = f"ef {rows[-1]['setting']}"

    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    _, build = _timed(lambda: flat.add(vectors))
    memory = faiss.serialize_index(flat).nbytes
    found, batched_s = _timed(lambda: flat.search(queries, K)[1])
    faiss.omp_set_num_threads(1)
    _, single_s = _timed(lambda: [flat.search(q[None], K) for q in queries])
    rows.append(_row("FAISS Flat (IP)", build, single_s, batched_s, _recall(found, exact), memory, len(queries)))

    faiss.omp_set_num_threads(threads)
    graph = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 200
    _, build = _timed(lambda: graph.add(vectors))
    memory = faiss.serialize_index(graph).nbytes

    def faiss_batched(ef):
        faiss.omp_set_num_threads(threads)
        graph.hnsw.efSearch = ef
        return graph.search(queries, K)[1]

    def faiss_single(ef, q):
        faiss.omp_set_num_threads(1)
        return graph.search(q[None], K)[1]

    rows.append(_sweep("FAISS HNSW (M=32, efC=200)", build, memory, queries, exact, [10, 20, 40, 80, 160, 320],
                       faiss_single, faiss_batched))
    rows[-1]["setting"] = f"efSearch {rows[-1]['setting']}"
    return rows
