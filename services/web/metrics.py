"""The web service's Prometheus metrics, on their own port as the gRPC services' are (`--metrics-port`).

- `http_server_requests_total{route,method,status}`: requests answered, by route template
  (`/api/search`, `/api/images/{image_id:path}`; `unmatched` for a request answered without a route:
  a path no route serves, or a body over the limit refused before routing; so no caller can make a
  series per URL), HTTP method and status code;
- `http_server_request_duration_seconds{route,method}`: latency histogram, to the response's last byte;
- `http_server_in_flight`: requests being answered now.

An ASGI middleware (`RequestMetrics`) measures every HTTP request, the ones refused before a handler
(413, 404) and the ones that raised (500) too.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, MetricsEndpoint

UNMATCHED = "unmatched"


class WebMetrics(MetricsEndpoint):
    """The web service's metrics in their own registry; served on `metrics_port` (None: not served;
    0: a free port, read `port` once started)."""

    def __init__(self, metrics_port: int | None = None):
        self.metrics_port = metrics_port
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("http_server_requests", "HTTP requests answered, by route template and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("http_server_request_duration_seconds", "HTTP request latency, by route template",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("http_server_in_flight", "HTTP requests being answered now", registry=registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)


class RequestMetrics:
    """ASGI middleware: each HTTP request counted and timed under the template of the route that served it."""

    def __init__(self, app, metrics: WebMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless a response starts: an error that escaped every handler

        async def noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, noting_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or UNMATCHED  # the router records the route it chose
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - started)
