"""Serving under load on loopback: text Search through the gateway and the same searches on the
index service directly (the gateway's cost as a ratio), and image-query latency. The load comes
from separate processes so the client's own GIL does not cap it."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from bench.capacity import running_services

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
    queue.put((latencies, errors[0]))


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
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2), "errors": sum(r[1] for r in results)}


def _cpu_seconds(processes) -> list[float]:
    """User + system CPU seconds used so far by each process (all its threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = []
    for process in processes:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds.append((int(fields[11]) + int(fields[12])) / ticks)
    return seconds


def bench(artifacts: str, photo: Path, seconds: float = 10.0, clients: int = 16) -> dict:
    with running_services(artifacts) as (addresses, servers):
        gateway, index = addresses["gateway"], addresses["index"]
        before = _cpu_seconds(servers)
        text = load("gateway", gateway, seconds, clients, 4)
        spent = [after - start for after, start in zip(_cpu_seconds(servers), before)]
        queries = text["qps"] * seconds
        text["cpu_ms_per_query"] = {name: round(cpu / queries * 1000, 3)
                                    for name, cpu in zip(("index", "encoder", "gateway"), spent)}
        before = _cpu_seconds(servers)
        direct = load("index", index, seconds, clients, 4, addresses["encoder"].encode())
        direct["cpu_ms_per_query"] = {
            "index": round((_cpu_seconds(servers)[0] - before[0]) / (direct["qps"] * seconds) * 1000, 3)}
        image = load("image", gateway, seconds, 2, 2, photo.read_bytes())
    return {"gateway_text_search": text, "index_search_direct": direct, "gateway_image_similar": image,
            "gateway_overhead_p50": round(text["p50_ms"] / direct["p50_ms"], 2),
            "gateway_qps_ratio": round(direct["qps"] / text["qps"], 2)}
