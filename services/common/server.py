"""What every service shares: a gRPC server with health, reflection, limits and graceful shutdown."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import artifact, security
from services.common.errors import quoted
from services.common.limits import CallLimits, Limits
from services.common import metrics
from services.common.metrics import Telemetry

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRACE_SECONDS = 5.0
VERSION_METADATA = "semsearch-artifact-version"
RETRY_SECONDS_MAX = 60.0
RELOAD_SECONDS = 2.0
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 1 << 20
M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc's mallopt parameters


class Loading:
    """A service's core, one per artifact version: UNAVAILABLE until the first has loaded.

    On an artifact switch the new core replaces the current one whole (never half-loaded), and the
    one before stays answerable until the next switch, so that a caller (the gateway) keeps the
    encoder and the index on one version however late the other one loads (or while it retries a
    failed load). That costs the memory of a second version, never of a third.
    """

    def __init__(self, name: str, telemetry: Telemetry | None = None):
        self.name = name
        self.telemetry = telemetry
        self.core = None
        self.error: BaseException | None = None
        self._previous = None

    def get(self, context: grpc.ServicerContext, version: str = "", current_only: bool = False):
        """The current core, or the one of `version`; FAILED_PRECONDITION naming ours if we lack it.

        `current_only`: `version` must be the current one (writes go to the current version only).
        """
        core = self.core
        if core is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"{self.name} {'failed to load its artifact' if self.error else 'is still loading'}")
        if not version or version == core.version:
            return core
        previous = self._previous
        if not current_only and previous is not None and previous.version == version:
            return previous
        context.set_trailing_metadata(((VERSION_METADATA, core.version),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"{self.name} serves artifact {core.version}, not {quoted(version)}")

    def install(self, core) -> None:
        """Make `core` current; the current one becomes the previous, kept until the next switch."""
        first = self.core is None
        self._previous, self.core = self.core, core
        _refresh(core)
        if self.telemetry is not None:
            self.telemetry.loaded(core.version, first)


def _refresh(core) -> None:
    """Cores with live state (the index's log) catch up with it."""
    refresh = getattr(core, "refresh", None)
    if refresh is not None:
        refresh()


@contextmanager
def grpc_server(
    port: int,
    add_servicers: Callable[[grpc.Server], list[str]],
    host: str = "127.0.0.1",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    tls: security.ServerTls | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    limits: Limits | None = None,
    telemetry: Telemetry | None = None,
) -> Iterator[tuple[grpc.Server, int, health.HealthServicer]]:
    """Start a server with the given servicers, health (NOT_SERVING) and reflection; stop it on exit.

    `add_servicers` registers the servicers and returns their full service names. With `tls` the port
    speaks TLS only (mutual TLS when it names a client CA); `interceptors` (authentication) run before
    every handler, then the call limits (see `services.common.limits`). `telemetry` measures, logs and
    traces every call (as far as each is on), the refused ones too, and serves the metrics on `host`.
    """
    limits = limits or Limits()
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    observers = telemetry.interceptors() if telemetry is not None else []
    interceptors = [*observers, *interceptors, CallLimits(limits)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.threads), options=options,
                         interceptors=interceptors, maximum_concurrent_rpcs=limits.max_open)
    names = add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if limits.reflection:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = security.add_port(server, host, port, tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    log.info("listening on %s:%d%s (%s)", host, bound, " with TLS" if tls else "", ", ".join(names))
    try:
        if telemetry is not None:
            telemetry.start(host)
        yield server, bound, health_servicer
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(GRACE_SECONDS).wait()
        if telemetry is not None:
            telemetry.stop()


@contextmanager
def serve_when_loaded(
    port: int,
    host: str,
    service: str,
    register: Callable[[grpc.Server, Loading], None],
    artifacts: str | Path,
    load: Callable[[Path], object],
    on_load_failure: Callable[[BaseException], None] | None = None,
    tls: security.ServerTls | None = None,
    reload_seconds: float = RELOAD_SECONDS,
    limits: Limits | None = None,
    telemetry: Telemetry | None = None,
) -> Iterator[tuple[grpc.Server, int]]:
    """A server whose core loads in the background: UNAVAILABLE and NOT_SERVING until it has.

    `load(version_dir)` makes the core of one artifact version. Every `reload_seconds` (0: never)
    the artifact root's `current` link is checked, and a newly published version is loaded beside
    the serving one and switched to once whole, without a restart.
    """
    loading = Loading(service.rsplit(".", 1)[-1], telemetry)

    def add(server: grpc.Server) -> list[str]:
        register(server, loading)
        return [service]

    stop = threading.Event()
    with grpc_server(port, add, host=host, tls=tls, limits=limits,
                     telemetry=telemetry) as (server, bound, health_servicer):
        follower = threading.Thread(
            target=follow_artifacts, name=f"load-{loading.name}", daemon=True,
            args=(loading, artifacts, load, lambda: set_serving(health_servicer, [service], True),
                  on_load_failure, reload_seconds, stop))
        follower.start()
        try:
            yield server, bound
        finally:
            stop.set()
    follower.join(timeout=GRACE_SECONDS)


def add_reload_argument(parser) -> None:
    parser.add_argument("--reload-seconds", type=float,
                        default=float(os.environ.get("RELOAD_SECONDS", RELOAD_SECONDS)),
                        help="how often to look for a newly published artifact and switch to it "
                             f"without a restart (default {RELOAD_SECONDS:g}; 0: never)")


def set_serving(health_servicer: health.HealthServicer, names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        health_servicer.set(name, status)


def follow_artifacts(loading: Loading, artifacts: str | Path, load: Callable[[Path], object],
                     on_ready: Callable[[], None], on_failure: Callable[[BaseException], None] | None,
                     reload_seconds: float, stop: threading.Event) -> None:
    """Load the current version (health turns SERVING), then switch to each newly published one.

    A new version that fails to load is logged, and tried again after a back-off that doubles from
    `reload_seconds` up to RETRY_SECONDS_MAX; the serving one goes on answering meanwhile.
    """
    try:
        loaded = artifact.resolve(artifacts)
        loading.install(load(loaded))
        on_ready()
    except Exception as error:  # reported through UNAVAILABLE, the log and on_failure
        loading.error = error
        _count_failure(loading)
        log.exception("%s failed to load", loading.name)
        if on_failure is not None:
            on_failure(error)
        return
    failed: Path | None = None
    failures, retry_at = 0, 0.0
    while reload_seconds > 0 and not stop.wait(reload_seconds):
        directory = None
        try:
            directory = artifact.resolve(artifacts)
            if directory != loaded and (directory != failed or time.monotonic() >= retry_at):
                log.info("%s: artifact %s published; loading it beside %s", loading.name, directory.name,
                         loading.core.version)
                loading.install(load(directory))
                loaded, failed, failures = directory, None, 0
                log.info("%s: now serving artifact %s", loading.name, directory.name)
            else:
                _refresh(loading.core)
        except Exception:  # the serving version stays; this one is tried again after a back-off
            _count_failure(loading)
            failures = failures + 1 if directory == failed else 1
            failed = directory
            retry_at = time.monotonic() + min(reload_seconds * 2 ** failures, RETRY_SECONDS_MAX)
            log.exception("%s: could not load artifact %s or apply the live log (attempt %d); still serving %s",
                          loading.name, directory, failures, loading.core.version)


def _count_failure(loading: Loading) -> None:
    if loading.telemetry is not None:
        loading.telemetry.load_failed()


def start_entry_point(service: str, artifacts: str | None = None, log_format: str = "text") -> None:
    """What every service's main() does first: log to stderr, few malloc arenas, fail fast without an artifact."""
    metrics.configure_logging(log_format)
    limit_malloc_arenas()
    if artifacts is not None:
        try:
            artifact.resolve(artifacts)
        except artifact.ArtifactError as error:
            sys.exit(f"{service}: {error}")


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """glibc gives each busy thread its own heap and, once a large block is freed, serves blocks of
    that size from the heaps too, where freed image buffers stay resident: with 20 worker threads a
    few concurrent large decodes would leave hundreds of MB behind. Before any worker starts, cap the
    heaps and keep large blocks (decoded images) in their own mappings, returned when freed, as
    MALLOC_ARENA_MAX and MALLOC_MMAP_THRESHOLD_ would (either variable, when set, wins)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(M_ARENA_MAX, arenas)
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


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
