"""Wait until services report SERVING on the standard health service, or answer 200 on an HTTP health
URL such as the web service's `http://host:port/healthz` (used by `make serve` and as a readiness
probe in the deploy examples)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import security


def http_status(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return "SERVING" if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError as error:
        return f"unreachable ({error})"


def status(address: str, tls: security.ClientTls | None = None) -> str:
    if address.startswith(("http://", "https://")):
        return http_status(address)
    with security.channel(address, tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_serving(address: str, timeout: float = 180.0, tls: security.ClientTls | None = None) -> None:
    """Block until `address` reports SERVING (over TLS with `tls`); TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while status(address, tls) != "SERVING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not SERVING after {timeout} s")
        time.sleep(0.2)


def alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("services", nargs="+", metavar="NAME=ADDRESS[@PIDFILE]",
                        help="ADDRESS: host:port (gRPC health) or an http(s):// health URL")
    parser.add_argument("--timeout", type=float, default=600.0)
    security.add_client_tls_arguments(parser, env_prefix="WAIT_", what="every service")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls = security.or_exit("wait_ready", security.client_tls_from_args, args)
    pending = {}
    for spec in args.services:
        name, _, rest = spec.partition("=")
        address, _, pid_file = rest.partition("@")
        pending[name] = (address, Path(pid_file) if pid_file else None)
    deadline = time.monotonic() + args.timeout
    while pending:
        for name, (address, pid_file) in list(pending.items()):
            if pid_file is not None and not alive(pid_file):
                print(f"{name} ({address}) exited while starting; see its log", file=sys.stderr)
                return 1
            if status(address, tls) == "SERVING":
                print(f"{name} SERVING on {address}")
                del pending[name]
        if pending and time.monotonic() > deadline:
            print(f"not SERVING after {args.timeout:.0f} s: {', '.join(pending)}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
