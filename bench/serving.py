"""Serving under load on loopback: text Search through the gateway (with its text-vector cache, and a
second gateway without it) and the same searches on the index service directly (the gateway's cost as
a ratio), and image-query latency. The load comes from separate processes so the client's own GIL does
not cap it."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.capacity import REPO, _free_port, running_services

WORDS = ["dog", "cat", "ship", "truck", "horse", "bird", "frog", "deer", "airplane", "car", "boat", "sea",
         "road", "sky", "water", "animal", "plane", "house", "tree", "green"]


class HttpFailure(Exception):
    """An HTTP answer other than 200."""


def _http_search(address: str):
    """`call(i)`: GET /api/search on the web service at `address` (host:port), one keep-alive connection per thread."""
    import http.client
    import threading

    host, port = address.rsplit(":", 1)
    local = threading.local()

    def call(i: int) -> None:
        if getattr(local, "connection", None) is None:
            local.connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            local.connection.request("GET", f"/api/search?q={WORDS[i % len(WORDS)]}&k=10")
            response = local.connection.getresponse()
            body = response.read()
        except OSError:
            local.connection.close()
            local.connection = None
            raise
        if response.status != 200 or not body.startswith(b'{"query"'):
            raise HttpFailure(f"HTTP {response.status}: {body[:200]!r}")

    return call


def _worker(kind: str, address: str, seconds: float, threads: int, payload: bytes, queue) -> None:
    """One load process: `threads` threads calling for `seconds`; puts (latencies, errors) on the queue."""
    import http.client
    import threading

    import grpc

    from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc
    from services.gateway.client import Client

    cpu_started = time.process_time()
    latencies, errors = [], [0]
    client = Client(address, timeout=10)
    channel = grpc.insecure_channel(address)
    vectors = {}
    if kind == "index":
        with grpc.insecure_channel(payload.decode()) as encoder_channel:
            encoder = encoder_pb2_grpc.EncoderStub(encoder_channel)
            vectors = {w: encoder.EncodeText(encoder_pb2.EncodeTextRequest(text=w)).vector.values for w in WORDS}
    index = index_pb2_grpc.IndexStub(channel)
    calls = {
        "gateway": lambda i: client.search(WORDS[i % len(WORDS)], k=10),
        "explain": lambda i: client.search(WORDS[i % len(WORDS)], k=10, explain=True),
        "index": lambda i: index.Search(index_pb2.IndexSearchRequest(
            index="images", vector=index_pb2.FloatVector(values=vectors[WORDS[i % len(WORDS)]]), k=10), timeout=10),
        "image": lambda i: client.similar(payload, k=10),
        "http": _http_search(address) if kind == "http" else None,
    }
    call = calls[kind]
    stop_at = time.perf_counter() + seconds

    def loop(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                call(i)
                latencies.append(time.perf_counter() - started)
            except (grpc.RpcError, OSError, http.client.HTTPException, HttpFailure):
                errors[0] += 1
            i += threads

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    queue.put((latencies, errors[0], time.process_time() - cpu_started))


def load(kind: str, address: str, seconds: float, clients: int, processes: int, payload: bytes = b"") -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(kind, address, seconds, clients // processes, payload, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = np.sort(np.concatenate([np.asarray(r[0]) for r in results]))
    return {"clients": clients, "seconds": seconds, "qps": round(len(latencies) / seconds),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2), "errors": sum(r[1] for r in results),
            # the load generator's own CPU (its processes share the cores with the servers)
            "load_cpu_ms_per_query": round(sum(r[2] for r in results) / max(1, len(latencies)) * 1000, 3)}


def _cpu_seconds(processes) -> list[float]:
    """User + system CPU seconds used so far by each process (all its threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = []
    for process in processes:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds.append((int(fields[11]) + int(fields[12])) / ticks)
    return seconds


@contextmanager
def gateway_without_text_cache(addresses: dict[str, str]):
    """One more gateway process in front of the same encoder and index, keeping no text vectors."""
    from services.common.wait_ready import wait_serving

    address = f"127.0.0.1:{_free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "services.gateway.server", "--port", address.rsplit(":", 1)[1],
                                "--encoder", addresses["encoder"], "--index", addresses["index"], "--text-cache", "0"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(address)
        yield address, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def measured(kind: str, address: str, seconds: float, clients: int, processes: list, names: tuple[str, ...],
             payload: bytes = b"") -> dict:
    """load(), with the CPU milliseconds each of `processes` spent per query."""
    before = _cpu_seconds(processes)
    result = load(kind, address, seconds, clients, 4, payload)
    spent = [after - start for after, start in zip(_cpu_seconds(processes), before)]
    result["cpu_ms_per_query"] = {name: round(cpu / (result["qps"] * seconds) * 1000, 3)
                                  for name, cpu in zip(names, spent)}
    return result


def bench(artifacts: str, photo: Path, seconds: float = 10.0, clients: int = 16) -> dict:
    with running_services(artifacts) as (addresses, servers):
        gateway, index = addresses["gateway"], addresses["index"]
        text = measured("gateway", gateway, seconds, clients, servers, ("index", "encoder", "gateway"))
        eight = measured("gateway", gateway, seconds, 8, servers, ("index", "encoder", "gateway"))
        with gateway_without_text_cache(addresses) as (uncached_address, uncached):
            uncached_text = measured("gateway", uncached_address, seconds, clients, [*servers[:2], uncached],
                                     ("index", "encoder", "gateway"))
        direct = measured("index", index, seconds, clients, servers[:1], ("index",), addresses["encoder"].encode())
        image = load("image", gateway, seconds, 2, 2, photo.read_bytes())
    return {"gateway_text_search": text, "gateway_text_search_8_clients": eight,
            "gateway_text_search_no_text_cache": uncached_text,
            "index_search_direct": direct, "gateway_image_similar": image,
            "gateway_overhead_p50": round(text["p50_ms"] / direct["p50_ms"], 2),
            "gateway_qps_ratio": round(direct["qps"] / text["qps"], 2),
            "gateway_qps_ratio_no_text_cache": round(direct["qps"] / uncached_text["qps"], 2)}


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="the gateway's cost against the index's, under load")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients of the searches (default 16)")
    parser.add_argument("--photo", default=str(REPO.parent / "shared/data/cifar10/test/ship/0000.jpg"))
    args = parser.parse_args()
    print(json.dumps(bench(args.artifacts, Path(args.photo), args.seconds, args.clients), indent=2))


if __name__ == "__main__":
    main()
