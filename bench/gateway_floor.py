"""The floor under the gateway's cost: what one gRPC hop costs in Python with no work in it.

    python -m bench.gateway_floor [--artifacts artifacts] [--seconds 6] [--rounds 2] [--clients 16]
                                  [--search-calls 0,1,2]

In one run, the same vector searches (16 clients in 4 load processes) go to the index directly, through a
bare proxy that forwards Index.Search and does nothing else (sync gRPC as the gateway is, and grpc.aio),
and text searches through the real gateway (its text-vector cache warm), once for each `--search-calls`
(searches under way downstream at once before the rest wait and go together; 0: each alone). Prints each
one's searches/s, p50/p99 and the CPU milliseconds per search of the index and of the hop in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from concurrent import futures

import grpc

from bench.capacity import REPO, _free_port, running_services
from bench.serving import measured
from semsearch.v1 import index_pb2_grpc
from services.common.wait_ready import wait_serving

PROXIES = ("sync", "aio")


def serve_sync_proxy(port: int, target: str) -> None:
    stub = index_pb2_grpc.IndexStub(grpc.insecure_channel(target))

    class Proxy(index_pb2_grpc.IndexServicer):
        def Search(self, request, context):
            return stub.Search(request, timeout=10)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=24))
    _serve(server, Proxy(), port)
    server.start()
    server.wait_for_termination()


async def serve_aio_proxy(port: int, target: str) -> None:
    stub = index_pb2_grpc.IndexStub(grpc.aio.insecure_channel(target))

    class Proxy(index_pb2_grpc.IndexServicer):
        async def Search(self, request, context):
            return await stub.Search(request, timeout=10)

    server = grpc.aio.server()
    _serve(server, Proxy(), port)
    await server.start()
    await server.wait_for_termination()


def _serve(server, proxy, port: int) -> None:
    from grpc_health.v1 import health, health_pb2_grpc

    index_pb2_grpc.add_IndexServicer_to_server(proxy, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # SERVING for ""
    server.add_insecure_port(f"127.0.0.1:{port}")


def _hop(module: str, *args: str) -> tuple[str, subprocess.Popen]:
    """`python -m module --port PORT *args` on a free port, until SERVING: (its address, its process)."""
    address = f"127.0.0.1:{_free_port()}"
    process = subprocess.Popen([sys.executable, "-m", module, "--port", address.rsplit(":", 1)[1], *args], cwd=REPO,
                               stderr=subprocess.DEVNULL)
    wait_serving(address)
    return address, process


def _measured_through(hop: tuple[str, subprocess.Popen], kind: str, seconds: float, clients: int, index, encoder: bytes
                      ) -> dict:
    address, process = hop
    try:
        return measured(kind, address, seconds, clients, [index, process], ("index", "hop"), encoder)
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench(artifacts: str, seconds: float, rounds: int, clients: int, search_calls: list[int]) -> dict:
    results: dict[str, list] = {}
    with running_services(artifacts) as (addresses, servers):
        index, encoder = servers[0], addresses["encoder"].encode()
        for round_number in range(rounds):
            results.setdefault("index directly", []).append(
                measured("index", addresses["index"], seconds, clients, [index], ("index",), encoder))
            for kind in PROXIES:
                proxy = _hop("bench.gateway_floor", "--serve-proxy", kind, addresses["index"])
                results.setdefault(f"bare {kind} proxy", []).append(
                    _measured_through(proxy, "index", seconds, clients, index, encoder))
            turn = round_number % len(search_calls)  # each setting first in turn
            for calls in search_calls[turn:] + search_calls[:turn]:
                gateway = _hop("services.gateway.server", "--encoder", addresses["encoder"], "--index",
                               addresses["index"], "--search-calls", str(calls))
                results.setdefault(f"gateway, search calls {calls}", []).append(
                    _measured_through(gateway, "gateway", seconds, clients, index, encoder))
    return results


def servicer_microseconds(calls: int = 20000) -> float:
    """The gateway servicer's own Python per cached text search: called in-process, its downstream a stand-in
    that answers 10 neighbours at once (plumbing only: no gRPC, no index)."""
    from semsearch.v1 import encoder_pb2, gateway_pb2, index_pb2
    from services.gateway.server import GatewayServicer
    from services.gateway.text_cache import TextVectorCache

    answer = index_pb2.IndexSearchResponse(artifact_version="v1", neighbors=[
        index_pb2.Neighbor(id=f"dog/{n:04d}.jpg", path=f"/photos/dog/{n:04d}.jpg", label="dog", score=0.5)
        for n in range(10)])

    class Context:
        def time_remaining(self):
            return 10.0

        def abort(self, code, details):
            raise RuntimeError(details)

    class Downstream:
        shards: list = []

        def search_images(self, request, context):
            return answer

    cache = TextVectorCache(10)
    cache.current = "v1"
    cache.put("dog", "v1", encoder_pb2.Vector(values=[0.1] * 50).values)
    servicer, request, context = GatewayServicer(Downstream(), cache), gateway_pb2.SearchRequest(text="dog", k=10), Context()
    for _ in range(1000):
        servicer.Search(request, context)
    started = time.perf_counter()
    for _ in range(calls):
        servicer.Search(request, context)
    return (time.perf_counter() - started) / calls * 1e6


def summary(results: dict) -> list[str]:
    direct = sum(r["qps"] for r in results["index directly"]) / len(results["index directly"])
    lines = []
    for name, runs in results.items():
        for run in runs:
            cpu = run["cpu_ms_per_query"]
            lines.append(f"{name:26s} {run['qps']:5d}/s ({run['qps'] / direct:.2f}x direct)  p50 {run['p50_ms']:6.2f} ms"
                         f"  p99 {run['p99_ms']:6.2f} ms  CPU ms/search: index {cpu['index']:.3f}"
                         + (f", hop {cpu['hop']:.3f}" if "hop" in cpu else "")
                         + f", load {run['load_cpu_ms_per_query']:.3f}  errors {run['errors']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--search-calls", default="0,1,2",
                        help="comma-separated gateway --search-calls settings to measure (default 0,1,2)")
    parser.add_argument("--serve-proxy", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)  # the proxy's
    args = parser.parse_args(argv)
    if args.serve_proxy:
        kind, target = args.serve_proxy
        if kind == "sync":
            serve_sync_proxy(args.port, target)
        else:
            asyncio.run(serve_aio_proxy(args.port, target))
        return
    results = bench(args.artifacts, args.seconds, args.rounds, args.clients,
                    [int(calls) for calls in args.search_calls.split(",")])
    print(json.dumps(results, indent=1))
    print("\n".join(summary(results)))
    print(f"gateway servicer alone, in-process: {servicer_microseconds():.0f} us per cached text search")


if __name__ == "__main__":
    main()
