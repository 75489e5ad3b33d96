"""What a running service shows: Prometheus metrics over HTTP and, with `--log-format json`, one JSON
line per request.

One `Telemetry` per server instance, with its own `CollectorRegistry`, so that several servers in one
process (the tests) never share or collide on a metric. Servicers and cores stay unaware of it: the
gRPC server interceptor (`RequestObserver`) measures every call, `Loading` records artifact versions,
the gateway's stubs time each downstream hop (`TimedMethod`), and
the few service-specific numbers (live adds, images per call) are one call each.

Metric names (the `semsearch_` ones are ours; `grpc_server_*` follows go-grpc-prometheus):

- `grpc_server_handled_total{grpc_service,grpc_method,grpc_code}`: calls finished, by status code;
- `grpc_server_handling_seconds{grpc_service,grpc_method}`: latency histogram;
- `grpc_server_in_flight{grpc_service,grpc_method}`: calls running now (health `Watch` streams count);
- `semsearch_downstream_seconds{hop,grpc_method,grpc_code}` (gateway): each call to the encoder, the
  index or an image shard;
- `semsearch_searches_per_call` (gateway): plain image searches in each call to the index (1: sent alone;
  more: batched in one SearchMany, services/gateway/batching.py);
- `semsearch_artifact_info{service,version}` (encoder, index): the artifact version served;
- `semsearch_artifact_reloads_total`, `semsearch_artifact_load_failures_total` (encoder, index);
- `semsearch_index_vectors{index}`, `semsearch_index_live_added_total`,
  `semsearch_index_live_deleted_total` (index);
- `semsearch_encoder_images_per_call`, `semsearch_encoder_image_seconds` (encoder): images in each
  image call and the call's time divided by them.

Traces (OpenTelemetry, `services.common.tracing`) come with the same object: give it a tracer
provider (or `--traces`) and its interceptors open a span per call, and the request log names the trace.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import threading
import time
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily

from services.common import tracing
from services.common.call_status import call_status, split_method
from services.common.limits import same_kind

REQUEST_LOGGER = "semsearch.requests"
LOG_FORMATS = ("text", "json")
# gRPC calls take from well under a millisecond (index) to seconds (a batch of images on the encoder)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SEARCHES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# the services' own metrics ports under `make serve` (and the deploy examples)
DEFAULT_PORTS = {"gateway": 9464, "encoder": 9465, "index": 9466, "web": 9467}
KINDS = ("gateway", "encoder", "index")

request_log = logging.getLogger(REQUEST_LOGGER)


class MetricsEndpoint:
    """/metrics over HTTP for a server's registry, on `metrics_port` (None: none; 0: a free port, read `port`
    once started)."""

    registry: CollectorRegistry
    metrics_port: int | None = None
    port: int | None = None
    _http = None

    def start(self, host: str) -> None:
        """Serve /metrics on `host`:`metrics_port` (nothing when metrics are off)."""
        if self.metrics_port is not None and self._http is None:
            self._http, _thread = start_http_server(self.metrics_port, addr=host, registry=self.registry)
            self.port = self._http.server_port
            logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class Telemetry(MetricsEndpoint):
    """One server's metrics (in its own registry), their HTTP endpoint, the request log setting and its tracer.

    `metrics_port`: None serves no metrics (and the interceptor skips measuring them); 0 picks a free
    port (read `port` once the server has started). `log_format="json"` logs one line per request.
    `tracer_provider`: where this server's spans go (default: the global provider; no spans, and no
    tracing interceptors, unless that is an SDK one).
    """

    def __init__(self, kind: str, metrics_port: int | None = None, log_format: str = "text", tracer_provider=None):
        if kind not in KINDS:
            raise ValueError(f"unknown service kind {kind!r}; one of {', '.join(KINDS)}")
        if log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {log_format!r}; one of {', '.join(LOG_FORMATS)}")
        self.kind = kind
        self.metrics_port = metrics_port
        self.log_json = log_format == "json"
        self.tracer = tracing.tracer_for(tracer_provider)
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels = ("grpc_service", "grpc_method")
        self.handled = Counter("grpc_server_handled_total", "gRPC calls finished, by status code",
                               [*labels, "grpc_code"], registry=registry)
        self.latency = Histogram("grpc_server_handling_seconds", "gRPC call latency", labels,
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("grpc_server_in_flight", "gRPC calls running now", labels, registry=registry)
        if kind == "gateway":
            self.text_cache = Counter("semsearch_text_cache_lookups", "text queries' vectors looked up in the "
                                      "gateway's cache, by result (hit: no encoder call)", ["result"], registry=registry)
            self.downstream = Histogram("semsearch_downstream_seconds", "each call to a downstream service",
                                        ["hop", "grpc_method", "grpc_code"], buckets=LATENCY_BUCKETS,
                                        registry=registry)
            self.searches_per_call = Histogram("semsearch_searches_per_call", "plain image searches in each call "
                                               "to the index (more than 1: batched)", buckets=SEARCHES_BUCKETS,
                                               registry=registry)
        else:
            self.artifact = Info("semsearch_artifact", "the artifact version served", registry=registry)
            self.reloads = Counter("semsearch_artifact_reloads", "switches to a newly published artifact version",
                                   registry=registry)
            self.load_failures = Counter("semsearch_artifact_load_failures",
                                         "artifact versions that failed to load", registry=registry)
        if kind == "index":
            self.live_added = Counter("semsearch_index_live_added", "images added live", registry=registry)
            self.live_deleted = Counter("semsearch_index_live_deleted", "images deleted live", registry=registry)
        if kind == "encoder":
            self.images_per_call = Histogram("semsearch_encoder_images_per_call", "images in each image call",
                                             buckets=IMAGES_BUCKETS, registry=registry)
            self.image_seconds = Histogram("semsearch_encoder_image_seconds",
                                           "an image call's time divided by its images", buckets=LATENCY_BUCKETS,
                                           registry=registry)

    @property
    def metrics_on(self) -> bool:
        return self.metrics_port is not None

    # -- what the services record -------------------------------------------------------------

    def loaded(self, version: str, first: bool) -> None:
        """A core of artifact `version` became current (`first`: at start, not a reload)."""
        self.artifact.info({"service": self.kind, "version": version})
        if not first:
            self.reloads.inc()

    def load_failed(self) -> None:
        self.load_failures.inc()

    def encoded_images(self, count: int, seconds: float) -> None:
        if count:
            self.images_per_call.observe(count)
            self.image_seconds.observe(seconds / count)

    def count_vectors(self, sizes: Callable[[], dict[str, int]]) -> None:
        """`semsearch_index_vectors{index}`, read from `sizes()` at each scrape."""
        self.registry.register(_VectorsCollector(sizes))

    # -- the HTTP endpoint and the interceptors ----------------------------------------------

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The server interceptors, outermost first: spans (when tracing), then metrics and request logs
        (when either is on). None at all when everything is off."""
        spans = [tracing.ServerSpans(self.tracer)] if self.tracer is not None else []
        return spans + ([RequestObserver(self)] if self.metrics_on or self.log_json else [])

    def channel_interceptors(self, hop: str) -> list[grpc.UnaryUnaryClientInterceptor]:
        """For the gateway's channel to `hop`: a span per call (when tracing; the hops' times are
        `downstream_stub`'s)."""
        return [tracing.ClientSpans(self.tracer, hop)] if self.tracer is not None else []

    def downstream_stub(self, stub, service, hop: str):
        """The gateway's `stub` for `hop`, its unary calls timed when metrics are on."""
        return timed_stub(stub, service, self.downstream, hop) if self.metrics_on else stub


class _VectorsCollector:
    def __init__(self, sizes: Callable[[], dict[str, int]]):
        self.sizes = sizes

    def describe(self):
        return [GaugeMetricFamily("semsearch_index_vectors", "vectors in each index served", labels=["index"])]

    def collect(self):
        family = GaugeMetricFamily("semsearch_index_vectors", "vectors in each index served", labels=["index"])
        for name, size in sorted(self.sizes().items()):
            family.add_metric([name], size)
        yield family


class RequestObserver(grpc.ServerInterceptor):
    """Counts, times and (JSON) logs every call, unary or streaming, whatever status it ends with.

    Put first among the interceptors, so that refusals by the others (a missing token, the call
    limits) are counted too.
    """

    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry
        self._children: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def _for(self, method: str):
        children = self._children.get(method)
        if children is None:
            service, name = split_method(method)
            t = self.telemetry
            with self._lock:
                children = self._children.setdefault(method, (
                    service, name,
                    t.latency.labels(service, name) if t.metrics_on else None,
                    t.in_flight.labels(service, name) if t.metrics_on else None,
                    {},  # status code -> its counter child
                ))
        return children

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)
        observe = self._observe

        if handler.response_streaming:
            def run(request, context):
                start, error = self._enter(method), None
                try:
                    yield from behavior(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    observe(method, start, context, error)
        else:
            def run(request, context):
                start, error = self._enter(method), None
                try:
                    return behavior(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    observe(method, start, context, error)

        return same_kind(handler, run)

    def _enter(self, method: str) -> float:
        gauge = self._for(method)[3]
        if gauge is not None:
            gauge.inc()
        return time.perf_counter()

    def _observe(self, method: str, start: float, context, error: BaseException | None) -> None:
        seconds = time.perf_counter() - start
        service, name, latency, gauge, counters = self._for(method)
        status = call_status(context, error)
        if gauge is not None:
            gauge.dec()
            latency.observe(seconds)
            counter = counters.get(status)
            if counter is None:
                counter = counters.setdefault(status, self.telemetry.handled.labels(service, name, status))
            counter.inc()
        if self.telemetry.log_json:
            request_log.info("%s %s %.3f ms", method, status, seconds * 1000, extra={"fields": {
                "service": self.telemetry.kind, "method": method, "status": status,
                "duration_ms": round(seconds * 1000, 3), "trace_id": tracing.current_trace_id()}})


class TimedMethod:
    """A stub's unary method whose calls, blocking or futures, are timed per hop, method and status code.

    A plain wrapper, not a gRPC client interceptor: timing by `grpc.intercept_channel` cost the gateway 6%
    of its CPU per search (bench.tracing; bench/findings.md, "What metrics cost")."""

    def __init__(self, method, histogram: Histogram, hop: str, name: str):
        self.method = method
        self._child = functools.partial(histogram.labels, hop, name)
        self._children: dict[str, object] = {}

    def _observe(self, code: grpc.StatusCode | None, seconds: float) -> None:
        name = code.name if code is not None else "UNKNOWN"
        child = self._children.get(name)
        if child is None:
            child = self._children.setdefault(name, self._child(name))
        child.observe(seconds)

    def __call__(self, request, **kwargs):
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return self.method(request, **kwargs)
        except grpc.RpcError as error:
            code = error.code()
            raise
        except BaseException:
            code = None
            raise
        finally:
            self._observe(code, time.perf_counter() - start)

    def future(self, request, **kwargs):
        start = time.perf_counter()
        call = self.method.future(request, **kwargs)
        call.add_done_callback(lambda finished: self._observe(finished.code(), time.perf_counter() - start))
        return call


def timed_stub(stub, service, histogram: Histogram, hop: str):
    """`stub` (of `service`, a ServiceDescriptor) with each unary method a TimedMethod for `hop`."""
    for method in service.methods:
        if not method.client_streaming and not method.server_streaming:
            setattr(stub, method.name, TimedMethod(getattr(stub, method.name), histogram, hop, method.name))
    return stub


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and a request's fields when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


JsonFormatter.converter = time.gmtime


def configure_logging(log_format: str = "text") -> None:
    """The services' logging on stderr: the usual text lines, or (json) every line a JSON object."""
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_metrics_port_argument(parser: argparse.ArgumentParser, kind: str) -> None:
    """--metrics-port (default $METRICS_PORT, else off)."""
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 0)),
                        help="serve Prometheus metrics over HTTP on this port, on --host "
                             f"(`make serve` uses {DEFAULT_PORTS[kind]}; default: $METRICS_PORT, else 0: off)")


def add_telemetry_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """--metrics-port, --log-format (default $LOG_FORMAT, else text) and --traces (see `tracing`)."""
    add_metrics_port_argument(parser, kind)
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get("LOG_FORMAT", "text"),
                        help="text (default: $LOG_FORMAT, else text), or json: every log line a JSON object, "
                             "and one line per request (method, status, duration_ms, trace_id)")
    tracing.add_trace_argument(parser)


def telemetry_from_args(args: argparse.Namespace, kind: str) -> Telemetry:
    return Telemetry(kind, args.metrics_port or None, args.log_format, tracing.tracer_provider(kind, args.traces))


def all_metric_names() -> set[str]:
    """Every series name the gRPC services can expose (for the dashboard's test)."""
    names = set()
    for kind in KINDS:
        telemetry = Telemetry(kind)
        if kind == "index":
            telemetry.count_vectors(lambda: {"images": 0})
        names |= registry_metric_names(telemetry.registry)
    return names


def registry_metric_names(registry: CollectorRegistry) -> set[str]:
    """Every series name of `registry`'s metrics, whether or not they have a sample yet."""
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names
