"""Measure what the capacity model needs, on this machine: memory per vector, search cost and
recall at 1M vectors, and QPS per core of each service. Prints Markdown and writes JSON.

    python -m bench.capacity --artifacts artifacts [--vectors 1000000] [--json bench/capacity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from batch import word_vectors
from services.common.items import Item
from services.index.core import VectorIndex

REPO = Path(__file__).resolve().parents[1]


def synthetic_vectors(n: int, dimension: int, seed: int = 0) -> np.ndarray:
    """Realistic unit vectors: GloVe 6B 50d rows (mapped to `dimension` by a fixed random matrix)
    plus noise, so the set keeps GloVe's clustered structure at any size."""
    glove = word_vectors.load().vectors
    rng = np.random.default_rng(seed)
    base = glove if dimension == 50 else glove @ rng.normal(size=(50, dimension)).astype(np.float32) / np.sqrt(50)
    out = np.empty((n, dimension), np.float32)
    for start in range(0, n, 200_000):
        rows = base[rng.integers(0, len(base), min(200_000, n - start))]
        block = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        block += rng.normal(scale=0.35 / np.sqrt(dimension), size=block.shape).astype(np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_index(n: int, dimension: int, queries: int = 1000) -> dict:
    vectors = synthetic_vectors(n + queries, dimension)
    data, probe = vectors[:n], vectors[n:]
    items = [Item(f"img-{i:09d}", f"/data/images/{i:09d}.jpg", f"label{i % 1000}") for i in range(n)]
    started = time.perf_counter()
    index = VectorIndex.build("images", data, items)
    build_seconds = time.perf_counter() - started
    exact = np.argpartition(-(probe[:200] @ data.T), 10, axis=1)[:, :10]
    recall = float(np.mean([len({h.item.id for h in index.search(q, 10)} & {items[i].id for i in row}) / 10
                            for q, row in zip(probe[:200], exact)]))
    started = time.perf_counter()
    for query in probe:
        index.search(query, 10)
    per_query = (time.perf_counter() - started) / len(probe)
    folder = Path(tempfile.mkdtemp())
    try:
        index.save(folder / "images")
        disk = sum(p.stat().st_size for p in (folder / "images").rglob("*") if p.is_file())
        loaded = json.loads(subprocess.run(
            [sys.executable, "-m", "bench.capacity", "--load-rss", str(folder / "images")],
            capture_output=True, text=True, check=True, cwd=REPO).stdout)
    finally:
        shutil.rmtree(folder)
    return {"vectors": n, "dimension": dimension, "config": index.config.__dict__,
            "build_seconds": round(build_seconds, 1), "recall_at_10": round(recall, 3),
            "search_ms_one_core": round(per_query * 1000, 3), "qps_one_core": round(1 / per_query),
            "disk_bytes_per_vector": round(disk / n), "memory_bytes_per_vector": round(loaded["rss"] / n)}


def _load_rss(directory: str) -> None:
    before = rss_bytes()
    index = VectorIndex.load("images", Path(directory))
    print(json.dumps({"rss": rss_bytes() - before, "size": len(index)}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_services(artifacts: str, flags: Sequence[str] = (), env: dict[str, str] | None = None,
                     metrics: bool = False) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """Index, encoder and gateway as separate processes on free loopback ports, until SERVING.

    `flags` are given to each of them (e.g. `--traces otlp`), `env` is their environment (default: ours);
    with `metrics`, each serves its metrics on a free port of its own.
    Yields ({"index": address, "encoder": ..., "gateway": ...}, the processes in that order).
    """
    from services.common.wait_ready import wait_serving

    addresses = {name: f"127.0.0.1:{_free_port()}" for name in ("index", "encoder", "gateway")}
    port = {name: address.rsplit(":", 1)[1] for name, address in addresses.items()}
    commands = [
        ["services.index.server", "--port", port["index"], "--artifacts", artifacts],
        ["services.encoder.server", "--port", port["encoder"], "--artifacts", artifacts],
        ["services.gateway.server", "--port", port["gateway"], "--encoder", addresses["encoder"],
         "--index", addresses["index"]],
    ]
    own = [["--metrics-port", str(_free_port())] if metrics else [] for _ in commands]
    processes = [subprocess.Popen([sys.executable, "-m", *command, *flags, *extra], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for command, extra in zip(commands, own)]
    try:
        for address in addresses.values():
            wait_serving(address)
        yield addresses, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def load_test(call, seconds: float, clients: int) -> dict:
    """`clients` threads calling `call()` for `seconds`: QPS, p50, p99 and errors."""
    latencies, errors = [], [0]
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                call()
                latencies.append(time.perf_counter() - started)
            except Exception:  # counted, not raised: the figure is the error count
                errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = np.sort(latencies)
    return {"qps": round(len(ordered) / seconds), "p50_ms": round(float(ordered[len(ordered) // 2]) * 1000, 2),
            "p99_ms": round(float(ordered[int(len(ordered) * 0.99)]) * 1000, 2), "errors": errors[0],
            "clients": clients, "seconds": seconds}


def measure_services(artifacts: str, seconds: float, photo: Path) -> dict:
    import grpc

    from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc
    from services.gateway.client import Client

    image = photo.read_bytes()
    with running_services(artifacts) as (addresses, _), Client(addresses["gateway"]) as client, \
            grpc.insecure_channel(addresses["encoder"]) as encoder_channel, \
            grpc.insecure_channel(addresses["index"]) as index_channel:
        encoder = encoder_pb2_grpc.EncoderStub(encoder_channel)
        index = index_pb2_grpc.IndexStub(index_channel)
        vector = encoder.EncodeText(encoder_pb2.EncodeTextRequest(text="dog")).vector.values
        search = index_pb2.IndexSearchRequest(index="images", vector=index_pb2.FloatVector(values=vector), k=10)
        return {
            "gateway_text_search": load_test(lambda: client.search("dog", k=10), seconds, 8),
            "index_search_direct": load_test(lambda: index.Search(search), seconds, 8),
            "encoder_text_direct": load_test(lambda: encoder.EncodeText(encoder_pb2.EncodeTextRequest(text="dog")),
                                             seconds, 8),
            "encoder_image_direct": load_test(lambda: encoder.EncodeImage(encoder_pb2.EncodeImageRequest(image=image)),
                                              seconds, 2),
        }


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; command: `{report['command']}`", "",
             "| vectors | dim | config | build s | recall@10 | ms/query (1 core) | QPS/core | bytes/vector in memory | on disk |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["indexes"]:
        c = row["config"]
        config = (c["method"] if c["method"] == "brute_force"
                  else f"tree {c['num_leaves']}/{c['leaves_to_search']}, AH, reorder {c['reorder']}")
        lines.append(f"| {row['vectors']:,} | {row['dimension']} | {config} | {row['build_seconds']} | {row['recall_at_10']} | "
                     f"{row['search_ms_one_core']} | {row['qps_one_core']:,} | {row['memory_bytes_per_vector']:,} | "
                     f"{row['disk_bytes_per_vector']:,} |")
    if report.get("services"):
        lines += ["", "| load on loopback (same 2 cores for client and server) | clients | QPS | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|"]
        for name, row in report["services"].items():
            lines.append(f"| {name} | {row['clients']} | {row['qps']:,} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", help="an artifact to load-test the services with (skipped if absent)")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dimensions", default="50,300")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--photo", default=str(REPO.parent / "shared/data/cifar10/test/ship/0000.jpg"))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--load-rss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_rss:
        _load_rss(args.load_rss)
        return 0
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "command": "python -m bench.capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
              "indexes": []}
    for dimension in (int(d) for d in args.dimensions.split(",")):
        print(f"index: {args.vectors:,} x {dimension} ...", file=sys.stderr, flush=True)
        report["indexes"].append(measure_index(args.vectors, dimension))
    if args.artifacts:
        print("services ...", file=sys.stderr, flush=True)
        report["services"] = measure_services(args.artifacts, args.seconds, Path(args.photo))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
