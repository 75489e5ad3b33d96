"""The HTTP/JSON API under load, beside the gRPC gateway in the same run: the same text searches from
16 clients (4 separate load processes) through `GET /api/search` and through the gateway directly.

    python -m bench.web --artifacts artifacts [--seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bench.capacity import REPO, _free_port, running_services
from bench.serving import load
from services.common.wait_ready import status

log = logging.getLogger(__name__)


@contextmanager
def web_process(gateway: str, thumbnails: Path) -> Iterator[str]:
    """The web service as its own process over `gateway`, until /healthz answers 200: yields host:port."""
    address = f"127.0.0.1:{_free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "services.web.server", "--port", address.rsplit(":", 1)[1],
                                "--gateway", gateway, "--thumbnails", str(thumbnails)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while status(f"http://{address}/healthz") != "SERVING":
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the web service did not come up on {address}")
            time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench(artifacts: str, thumbnails: Path, seconds: float = 10.0, clients: int = 16) -> dict:
    with running_services(artifacts) as (addresses, _), web_process(addresses["gateway"], thumbnails) as web:
        grpc_run = load("gateway", addresses["gateway"], seconds, clients, 4)
        http_run = load("http", web, seconds, clients, 4)
    return {"gateway_grpc": grpc_run, "web_http": http_run,
            "qps_ratio": round(http_run["qps"] / grpc_run["qps"], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--cache", default=os.environ.get("CACHE", ".cache"))
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = bench(args.artifacts, Path(args.cache) / "thumbnails", args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
