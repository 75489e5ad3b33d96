"""The web service: the page and the HTTP/JSON API on uvicorn, a client of the gateway over gRPC."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import uvicorn

from services.common import security
from services.common.metrics import add_metrics_port_argument
from services.common.server import wait_for_signal
from services.gateway.client import DEFAULT_ADDRESS, Client
from services.web.app import create_app
from services.web.metrics import WebMetrics

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
GATEWAY_TIMEOUT = 30.0


@contextmanager
def run_server(port: int, gateway: str = DEFAULT_ADDRESS, host: str = "127.0.0.1", *,
               thumbnails: Path | None = None, gateway_tls: security.ClientTls | None = None,
               tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None,
               access_log: bool = False, timeout: float = GATEWAY_TIMEOUT,
               metrics: WebMetrics | None = None) -> Iterator[tuple[uvicorn.Server, int]]:
    """Serve the page and the API on `port` (0 picks a free one) until the block ends.

    `thumbnails` is where thumbnails are cached (default: a temporary folder removed at the end);
    `tls_cert` and `tls_key` (PEM files) make it HTTPS, `tls_client_ca` also requires client
    certificates. `metrics` counts and times every request and serves them on its own port, on
    `host` (default: none). Yields once uvicorn has started listening.
    """
    with Client(gateway, timeout=timeout, tls=gateway_tls) as client, \
            tempfile.TemporaryDirectory(prefix="semsearch-thumbnails-") as scratch:
        app = create_app(client, Path(thumbnails) if thumbnails else Path(scratch), metrics)
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, ssl_ca_certs=tls_client_ca,
                                ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="web", daemon=True)
        thread.start()
        while not server.started:  # uvicorn sets `started` once listening; a failed start ends the thread
            thread.join(0.05)
            if not thread.is_alive():
                raise OSError(f"the web server could not start on {host}:{port} (see the log)")
        bound = server.servers[0].sockets[0].getsockname()[1]
        log.info("web page and API on %s://%s:%d/ (gateway %s)", "https" if tls_cert else "http", host, bound, gateway)
        try:
            if metrics is not None:
                metrics.start(host)
            yield server, bound
        finally:
            server.should_exit = True
            thread.join()
            if metrics is not None:
                metrics.stop()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Web service: the search page and the HTTP/JSON API")
    parser.add_argument("--port", type=int, default=int(env("WEB_PORT", DEFAULT_PORT)))
    parser.add_argument("--host", default=env("WEB_HOST", "127.0.0.1"))
    parser.add_argument("--gateway", default=env("SEMSEARCH_GATEWAY", DEFAULT_ADDRESS),
                        help=f"gateway address (default: $SEMSEARCH_GATEWAY or {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=float(env("GATEWAY_TIMEOUT", GATEWAY_TIMEOUT)),
                        help="seconds to wait for the gateway's answer")
    parser.add_argument("--thumbnails", default=env("THUMBNAILS", os.path.join(env("CACHE", ".cache"), "thumbnails")),
                        help="folder where thumbnails are cached (default: $THUMBNAILS, else $CACHE/thumbnails)")
    parser.add_argument("--access-log", action="store_true", default=bool(env("ACCESS_LOG")),
                        help="log one line per request (default: off; $ACCESS_LOG turns it on)")
    security.add_server_tls_arguments(parser)
    security.add_client_tls_arguments(parser, "gateway-", "SEMSEARCH_", "the gateway")
    add_metrics_port_argument(parser, "web")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security.or_exit("web", security.server_tls_from_args, args)  # check the files now: fail fast, in one line
    gateway_tls = security.or_exit("web", security.client_tls_from_args, args, "gateway-")
    if not args.tls_cert and not security.is_loopback(args.host):
        log.warning("serving HTTP on %s without TLS: give --tls-cert and --tls-key, or put a TLS proxy in front",
                    args.host)
    with run_server(args.port, args.gateway, args.host, thumbnails=Path(args.thumbnails), gateway_tls=gateway_tls,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                    access_log=args.access_log, timeout=args.timeout,
                    metrics=WebMetrics(args.metrics_port) if args.metrics_port else None):
        wait_for_signal(threading.Event())


if __name__ == "__main__":
    main()
