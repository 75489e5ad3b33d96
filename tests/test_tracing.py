"""Traces across the real gateway, encoder and index (in-process, loopback, the test artifact), and the
JSON request lines that name them.

Each server gets its own SDK tracer provider (its own service name), all writing to one in-memory
exporter, so no test sets the process-wide provider. The OTLP and console exporters are checked on
their own: OTLP against a stand-in collector (a real gRPC server that keeps what it receives).
"""

from __future__ import annotations

import io
import json
import logging
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import metrics, tracing
from services.common.wait_ready import wait_serving
from services.encoder import server as encoder_server
from services.gateway import server as gateway_server
from services.index import server as index_server

GATEWAY_SEARCH = "semsearch.v1.Gateway/Search"
ENCODE_TEXT = "semsearch.v1.Encoder/EncodeText"
INDEX_SEARCH = "semsearch.v1.Index/Search"
# a caller's own trace, as another traced service would send it
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@dataclass
class Traced:
    gateway: str
    spans: InMemorySpanExporter
    log: io.StringIO

    def search(self, text: str, metadata=()):
        self.spans.clear()
        self.log.seek(0)
        self.log.truncate()
        with grpc.insecure_channel(self.gateway) as channel:
            return gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(text=text, k=3), timeout=30,
                                                                metadata=metadata)

    def finished_spans(self, count: int) -> list:
        """The spans once `count` have ended (a client span ends in the gateway's call callback)."""
        deadline = time.monotonic() + 30
        while len(spans := self.spans.get_finished_spans()) < count:
            assert time.monotonic() < deadline, f"only {len(spans)} of {count} spans ended"
            time.sleep(0.01)
        assert len(spans) == count, [span.name for span in spans]
        return list(spans)

    def request_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


def provider_for(kind: str, exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource({"service.name": f"semsearch-{kind}"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture(scope="module")
def traced(artifact_root):
    """Gateway, encoder and index, each tracing to one in-memory exporter, with JSON request lines."""
    exporter, log = InMemorySpanExporter(), io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(metrics.JsonFormatter())
    logger = logging.getLogger(metrics.REQUEST_LOGGER)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO

    def telemetry(kind: str) -> metrics.Telemetry:
        return metrics.Telemetry(kind, log_format="json", tracer_provider=provider_for(kind, exporter))

    try:
        with index_server.run_server(0, str(artifact_root), reload_seconds=0,
                                     telemetry=telemetry("index")) as (_, index), \
                encoder_server.run_server(0, str(artifact_root), reload_seconds=0,
                                          telemetry=telemetry("encoder")) as (_, encoder), \
                gateway_server.run_server(0, f"127.0.0.1:{encoder}", f"127.0.0.1:{index}",
                                          telemetry=telemetry("gateway")) as (_, gateway):
            for port in (index, encoder, gateway):
                wait_serving(f"127.0.0.1:{port}")
            yield Traced(f"127.0.0.1:{gateway}", exporter, log)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def by_name_and_kind(spans) -> dict:
    return {(span.name, span.kind): span for span in spans}


def parent_of(span) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_one_search_is_one_trace_through_gateway_encoder_and_index(traced):
    assert traced.search("cat").results
    spans = traced.finished_spans(5)
    assert len({span.context.trace_id for span in spans}) == 1
    found = by_name_and_kind(spans)
    gateway = found[(GATEWAY_SEARCH, SpanKind.SERVER)]
    to_encoder, to_index = found[(ENCODE_TEXT, SpanKind.CLIENT)], found[(INDEX_SEARCH, SpanKind.CLIENT)]
    encoder, index = found[(ENCODE_TEXT, SpanKind.SERVER)], found[(INDEX_SEARCH, SpanKind.SERVER)]
    # the gateway's span starts the trace; each hop is its child; each downstream server's span, the hop's
    assert gateway.parent is None
    assert parent_of(to_encoder) == parent_of(to_index) == gateway.context.span_id
    assert parent_of(encoder) == to_encoder.context.span_id and parent_of(index) == to_index.context.span_id
    assert encoder.parent.is_remote and index.parent.is_remote  # they came in the call's metadata
    assert to_encoder.start_time < to_index.start_time  # encode first, then search
    assert {span.resource.attributes["service.name"] for span in (gateway, to_encoder, to_index)} == {"semsearch-gateway"}
    assert encoder.resource.attributes["service.name"] == "semsearch-encoder"
    assert index.resource.attributes["service.name"] == "semsearch-index"
    assert (to_encoder.attributes["semsearch.hop"], to_index.attributes["semsearch.hop"]) == ("encoder", "index")
    assert all(span.status.status_code == StatusCode.UNSET and span.attributes["rpc.grpc.status_code"] == 0
               for span in spans)
    assert index.attributes["rpc.service"] == "semsearch.v1.Index" and index.attributes["rpc.method"] == "Search"


def test_a_search_joins_the_callers_trace(traced):
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    assert traced.search("dog", metadata=[("traceparent", traceparent)]).results
    spans = traced.finished_spans(5)
    assert {format_trace_id(span.context.trace_id) for span in spans} == {CALLER_TRACE}
    gateway = by_name_and_kind(spans)[(GATEWAY_SEARCH, SpanKind.SERVER)]
    assert format_span_id(parent_of(gateway)) == CALLER_SPAN and gateway.parent.is_remote


def test_each_service_logs_its_request_with_the_trace_id(traced):
    traced.search("ship")
    (trace_id,) = {format_trace_id(span.context.trace_id) for span in traced.finished_spans(5)}
    calls = [line for line in traced.request_lines() if not line["method"].startswith("/grpc.health")]
    assert [(c["service"], c["method"], c["status"]) for c in calls] == [
        ("encoder", f"/{ENCODE_TEXT}", "OK"), ("index", f"/{INDEX_SEARCH}", "OK"), ("gateway", f"/{GATEWAY_SEARCH}", "OK")]
    assert all(c["trace_id"] == trace_id and c["duration_ms"] >= 0 for c in calls)
    # health checks are not traced: their lines (if one fell in this window) name no trace
    assert all(line["trace_id"] is None for line in traced.request_lines() if line["method"].startswith("/grpc.health"))


def test_a_refused_search_has_its_status_on_every_span(traced):
    """An unknown word: the encoder answers NOT_FOUND, the gateway passes it on, the index is never asked."""
    with pytest.raises(grpc.RpcError) as refused:
        traced.search("qqxzvw")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    found = by_name_and_kind(traced.finished_spans(3))
    assert set(found) == {(GATEWAY_SEARCH, SpanKind.SERVER), (ENCODE_TEXT, SpanKind.CLIENT), (ENCODE_TEXT, SpanKind.SERVER)}
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert all(span.attributes["rpc.grpc.status_code"] == not_found for span in found.values())
    # the caller's mistake: a failed call for the gateway's client span, no fault of either server
    assert found[(ENCODE_TEXT, SpanKind.CLIENT)].status.status_code == StatusCode.ERROR
    assert found[(ENCODE_TEXT, SpanKind.SERVER)].status.status_code == StatusCode.UNSET
    assert found[(GATEWAY_SEARCH, SpanKind.SERVER)].status.status_code == StatusCode.UNSET
    line = next(line for line in traced.request_lines() if line["service"] == "gateway")
    assert line["status"] == "NOT_FOUND" and line["trace_id"] == format_trace_id(
        found[(GATEWAY_SEARCH, SpanKind.SERVER)].context.trace_id)


def test_traces_are_off_unless_asked(monkeypatch):
    for name in ("TRACES", *tracing.OTLP_ENDPOINTS):
        monkeypatch.delenv(name, raising=False)
    assert gateway_server.build_parser().parse_args([]).traces == "none"
    telemetry = metrics.telemetry_from_args(gateway_server.build_parser().parse_args(["--log-format", "json"]),
                                            "gateway")
    assert telemetry.tracer is None and telemetry.channel_interceptors("encoder") == []
    assert [type(i) for i in telemetry.interceptors()] == [metrics.RequestObserver]  # the request log only
    assert metrics.Telemetry("index").interceptors() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert index_server.build_parser().parse_args([]).traces == "otlp"
    monkeypatch.setenv("TRACES", "console")
    assert encoder_server.build_parser().parse_args([]).traces == "console"
    assert encoder_server.build_parser().parse_args(["--traces", "none"]).traces == "none"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OpenTelemetry collector: keeps every export request."""

    def __init__(self):
        self.received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_exporter_sends_the_services_spans_to_the_collector(monkeypatch):
    collector, server = Collector(), grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    provider = tracing.tracer_provider("index", "otlp")
    try:
        with tracing.tracer_for(provider).start_as_current_span("semsearch.v1.Index/Search"):
            trace_id = tracing.current_trace_id()
        assert provider.force_flush(30_000)
    finally:
        provider.shutdown()
        server.stop(None)
    (request,) = collector.received
    (resource_spans,) = request.resource_spans
    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert attributes["service.name"] == "semsearch-index"
    (span,) = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert span.name == "semsearch.v1.Index/Search" and span.trace_id.hex() == trace_id


def test_console_exporter_prints_one_json_line_per_span(capsys, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "encoder-eu-1")  # the SDK's variable wins over our default name
    provider = tracing.tracer_provider("encoder", "console")
    with tracing.tracer_for(provider).start_as_current_span("semsearch.v1.Encoder/EncodeText"):
        pass
    provider.shutdown()
    (line,) = capsys.readouterr().out.splitlines()
    span = json.loads(line)
    assert span["name"] == "semsearch.v1.Encoder/EncodeText"
    assert span["resource"]["attributes"]["service.name"] == "encoder-eu-1"
