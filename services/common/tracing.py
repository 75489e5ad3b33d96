"""OpenTelemetry traces across the services' gRPC hops.

Every traced server opens a SERVER span per call, a child of the caller's span when the call's
metadata carries one (W3C `traceparent`, read by the configured propagator); the gateway opens a
CLIENT span per downstream call and puts its context into that call's metadata. So one search
through the gateway is one trace: gateway `Search` -> its calls to the encoder and the index ->
the encoder's `EncodeText` and the index's `Search`.

Off by default, at no cost: with `--traces none` (and no SDK tracer provider set globally) no
interceptor is installed. `--traces otlp` exports over OTLP/gRPC (to $OTEL_EXPORTER_OTLP_ENDPOINT,
else localhost:4317; the exporter's other OTEL_EXPORTER_OTLP_* variables apply); `--traces console`
prints each span as one JSON line on stdout. The SDK's own variables apply as well: OTEL_TRACES_SAMPLER
(every call is sampled unless it says otherwise), OTEL_SERVICE_NAME (default semsearch-<service>),
OTEL_RESOURCE_ATTRIBUTES, OTEL_PROPAGATORS. Health checks and reflection are not traced.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.call_status import call_status, split_method
from services.common.limits import same_kind
from services.common.security import add_metadata

EXPORTERS = ("none", "console", "otlp")
UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# the codes that mark a server's span failed (its own faults, as OpenTelemetry's RPC conventions say);
# a client span is failed by any code but OK
SERVER_FAULTS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def default_exporter(env=os.environ) -> str:
    """$TRACES; else otlp when an OTLP endpoint is configured; else none."""
    if env.get("TRACES"):
        return env["TRACES"]
    return "otlp" if any(env.get(name) for name in OTLP_ENDPOINTS) else "none"


def add_trace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", choices=EXPORTERS, default=default_exporter(),
                        help="export OpenTelemetry spans: otlp (to $OTEL_EXPORTER_OTLP_ENDPOINT), console (JSON "
                             "lines on stdout) or none (default: $TRACES; else otlp when "
                             "$OTEL_EXPORTER_OTLP_ENDPOINT is set; else none)")


def tracer_provider(kind: str, exporter: str):
    """An SDK tracer provider for service `kind` exporting to `exporter`; None for "none"."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown trace exporter {exporter!r}; one of {', '.join(EXPORTERS)}")
    if exporter == "none":
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # with OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"semsearch-{kind}"}))
    provider = TracerProvider(resource=resource)  # flushed and shut down at exit
    provider.add_span_processor(BatchSpanProcessor(_span_exporter(exporter)))
    return provider


def _span_exporter(exporter: str):
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter
    return ConsoleSpanExporter(out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n")


def tracer_for(provider=None) -> trace.Tracer | None:
    """The tracer of `provider` (default: the global one), or None when that records nothing."""
    provider = provider if provider is not None else trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer("semsearch")


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None outside a recorded trace."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def _attributes(method: str) -> dict[str, str]:
    service, name = split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end(span: trace.Span, status: str, faults: set[str] | None) -> None:
    """Close `span` with the call's status: failed for a code in `faults` (None: any but OK)."""
    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[status].value[0])
    if (status != "OK") if faults is None else (status in faults):
        span.set_status(Status(StatusCode.ERROR, status))
    span.end()


class ServerSpans(grpc.ServerInterceptor):
    """A SERVER span around each unary call, in the trace of the caller's `traceparent` if it sent one.

    Put first among the interceptors, so that calls refused by the others have their span too and the
    request log (next) finds the span current.
    """

    def __init__(self, tracer: trace.Tracer):
        self.tracer = tracer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or handler.response_streaming or method.startswith(UNTRACED):
            return handler
        behavior, tracer, attributes = handler.unary_unary, self.tracer, _attributes(method)
        name = f"{attributes['rpc.service']}/{attributes['rpc.method']}"

        def run(request, context):
            parent = propagate.extract(dict(context.invocation_metadata()))
            span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            error = None
            try:
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    return behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                _end(span, call_status(context, error), SERVER_FAULTS)

        return same_kind(handler, run)


class ClientSpans(grpc.UnaryUnaryClientInterceptor):
    """A CLIENT span around each call on a channel (to `hop`), its context sent in the call's metadata."""

    def __init__(self, tracer: trace.Tracer, hop: str):
        self.tracer = tracer
        self.hop = hop

    def intercept_unary_unary(self, continuation, client_call_details, request):
        attributes = _attributes(client_call_details.method)
        span = self.tracer.start_span(f"{attributes['rpc.service']}/{attributes['rpc.method']}", kind=SpanKind.CLIENT,
                                      attributes={**attributes, "semsearch.hop": self.hop})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        call = continuation(add_metadata(client_call_details, carrier.items()), request)

        def done(finished) -> None:
            code = finished.code()
            _end(span, code.name if code is not None else "UNKNOWN", None)

        call.add_done_callback(done)
        return call
