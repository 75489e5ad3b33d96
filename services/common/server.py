"""What every service shares: a gRPC server with health, reflection, limits and graceful shutdown."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import artifact

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRACE_SECONDS = 5.0


class Loading:
    """Holds a service's core once it has loaded; until then calls are answered UNAVAILABLE."""

    def __init__(self, name: str):
        self.name = name
        self.core = None
        self.error: BaseException | None = None

    def get(self, context: grpc.ServicerContext):
        if self.core is None:
            reason = f"failed to load: {self.error}" if self.error else "still loading"
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is {reason}")
        return self.core


@contextmanager
def grpc_server(
    port: int,
    add_servicers: Callable[[grpc.Server], list[str]],
    host: str = "127.0.0.1",
    max_workers: int = 16,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> Iterator[tuple[grpc.Server, int, health.HealthServicer]]:
    """Start a server with the given servicers, health (NOT_SERVING) and reflection; stop it on exit.

    `add_servicers` registers the servicers and returns their full service names.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    names = add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    log.info("listening on %s:%d (%s)", host, bound, ", ".join(names))
    try:
        yield server, bound, health_servicer
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(GRACE_SECONDS).wait()


@contextmanager
def serve_when_loaded(
    port: int,
    host: str,
    service: str,
    register: Callable[[grpc.Server, Loading], None],
    load: Callable[[], object],
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> Iterator[tuple[grpc.Server, int]]:
    """A server whose core loads in the background: UNAVAILABLE and NOT_SERVING until it has."""
    loading = Loading(service.rsplit(".", 1)[-1])

    def add(server: grpc.Server) -> list[str]:
        register(server, loading)
        return [service]

    with grpc_server(port, add, host=host) as (server, bound, health_servicer):
        load_in_background(loading, load, lambda: set_serving(health_servicer, [service], True), on_load_failure)
        yield server, bound


def set_serving(health_servicer: health.HealthServicer, names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        health_servicer.set(name, status)


def load_in_background(loading: Loading, load: Callable[[], object], on_ready: Callable[[], None],
                       on_failure: Callable[[BaseException], None] | None = None) -> threading.Thread:
    """Load the core off the serving thread; health turns SERVING only when it has loaded."""

    def target() -> None:
        try:
            loading.core = load()
            on_ready()
        except Exception as error:  # reported through UNAVAILABLE, the log and on_failure
            loading.error = error
            log.exception("%s failed to load", loading.name)
            if on_failure is not None:
                on_failure(error)

    thread = threading.Thread(target=target, name=f"load-{loading.name}", daemon=True)
    thread.start()
    return thread


def start_entry_point(service: str, artifacts: str | None = None) -> None:
    """What every service's main() does first: log to stderr, and fail fast without an artifact."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if artifacts is not None:
        try:
            artifact.resolve(artifacts)
        except artifact.ArtifactError as error:
            sys.exit(f"{service}: {error}")


def wait_for_signal(stop: threading.Event) -> None:
    """Block until SIGTERM/SIGINT (or `stop` is set); leaving `grpc_server` then drains the server."""

    def handle(signum, _frame) -> None:
        log.info("signal %d: shutting down gracefully", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    stop.wait()


def serve_forever(start_server: Callable[..., ContextManager], *args, **kwargs) -> int:
    """Entry points: run `start_server(*args, on_load_failure=...)` until a signal; 1 if loading failed."""
    stop, failed = threading.Event(), threading.Event()

    def on_load_failure(_error: BaseException) -> None:
        failed.set()
        stop.set()

    with start_server(*args, on_load_failure=on_load_failure, **kwargs):
        wait_for_signal(stop)
    return 1 if failed.is_set() else 0
