"""What metrics and traces cost: the same text searches through four stacks of the three services running
side by side: all telemetry off (the default: no metrics or tracing interceptor at all), Prometheus
metrics on (each service on a metrics port of its own), every search traced, and one search in ten traced
(OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG 0.1), the two traced ones exporting over OTLP to a
collector. Rounds rotate the order (off-metrics-all-tenth, metrics-all-tenth-off, ...) so that a machine
whose load drifts weighs on all alike. Each collector is a sink in this process that counts the spans
it gets. Figures: throughput and p50 from 16 clients, and the servers' CPU time per search, all three
together and the gateway's alone.

    python -m bench.tracing --artifacts artifacts [--seconds 10] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path

import grpc

from bench.capacity import running_services
from bench.serving import _cpu_seconds, load

log = logging.getLogger(__name__)

SPANS_PER_SEARCH = 5  # gateway Search, its two hops, the encoder's EncodeText, the index's Search


class SpanSink:
    """An OTLP/gRPC trace collector on loopback that only counts the spans it receives."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self

        class Collector(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                sink.add(sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans))
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), self.server)
        self.endpoint = f"http://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def add(self, count: int) -> None:
        with self._lock:
            self.spans += count

    def wait_for(self, count: int, timeout: float = 30.0) -> int:
        """The spans received once `count` have arrived, or after `timeout` seconds (exports are batched)."""
        deadline = time.monotonic() + timeout
        while self.spans < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.spans

    def close(self) -> None:
        self.server.stop(None)


def _run(stack, seconds: float, clients: int) -> dict:
    """One load run on a stack: the load figures, and the servers' CPU per search."""
    addresses, servers = stack
    before = _cpu_seconds(servers)
    result = load("gateway", addresses["gateway"], seconds, clients, 4)
    spent = [after - start for after, start in zip(_cpu_seconds(servers), before)]
    searches = max(1, result["qps"] * seconds)
    result["server_cpu_ms_per_query"] = round(sum(spent) / searches * 1000, 3)
    result["gateway_cpu_ms_per_query"] = round(spent[2] / searches * 1000, 3)  # index, encoder, gateway
    return result


# what each stack runs with: telemetry off (the default), metrics on, every search traced, one in ten traced
SETTINGS = {
    "off": ({}, ["--traces", "none"]),
    "metrics": ({}, ["--traces", "none"]),
    "all": ({}, ["--traces", "otlp"]),
    "tenth": ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
              ["--traces", "otlp"]),
}


def bench(artifacts: str, seconds: float = 10.0, rounds: int = 3, clients: int = 16) -> dict:
    runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    sinks = {setting: SpanSink() for setting, (_, flags) in SETTINGS.items() if "otlp" in flags}
    try:
        with ExitStack() as stacks:
            stack = {setting: stacks.enter_context(running_services(
                artifacts, flags, {**os.environ, **env, **({"OTEL_EXPORTER_OTLP_ENDPOINT": sinks[setting].endpoint}
                                                         if setting in sinks else {})}, metrics=setting == "metrics"))
                for setting, (env, flags) in SETTINGS.items()}
            order = list(SETTINGS)
            for number in range(rounds):
                for setting in order[number % len(order):] + order[:number % len(order)]:
                    runs[setting].append(_run(stack[setting], seconds, clients))
                    log.info("round %d, traces %s: %s", number + 1, setting, runs[setting][-1])
            searches = sum(run["qps"] * seconds for run in runs["all"])
            spans = {"expected_all": round(searches * SPANS_PER_SEARCH),
                     "received_all": sinks["all"].wait_for(searches * SPANS_PER_SEARCH),
                     "received_tenth": sinks["tenth"].wait_for(0, timeout=0)}
    finally:
        for sink in sinks.values():
            sink.close()
    return summary(runs, spans)


def summary(runs: dict[str, list[dict]], spans: dict) -> dict:
    def median(setting: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[setting])

    ratios = {f"{key}_ratio_{setting}_to_off": round(median(setting, key) / median("off", key), 3)
              for setting in runs if setting != "off"
              for key in ("qps", "p50_ms", "server_cpu_ms_per_query", "gateway_cpu_ms_per_query")}
    medians = {setting: {key: median(setting, key) for key in ("qps", "p50_ms", "p99_ms", "server_cpu_ms_per_query",
                                                               "gateway_cpu_ms_per_query")}
               for setting in runs}
    return {"runs": runs, "medians": medians, "spans": spans, **ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = bench(args.artifacts, args.seconds, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
