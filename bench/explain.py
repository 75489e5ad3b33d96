"""What explanations cost: text Search through the gateway with `explain` off and on, side by side in one
run over the same three services, in rounds whose order rotates, so that a drift in the machine's load
shows as spread, not as a difference. With `--baseline-repo DIR`, a second gateway started from another checkout
(its own code and stubs, e.g. the main branch before explanations existed) over the same encoder and
index joins the rounds with explain off: explain off must cost what the old gateway costs.

    python -m bench.explain --artifacts artifacts [--seconds 10] [--rounds 3] [--baseline-repo ../main]
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

from bench.capacity import _free_port, running_services
from bench.serving import load
from services.common.wait_ready import wait_serving

log = logging.getLogger(__name__)


@contextmanager
def baseline_gateway(repo: Path, encoder: str, index: str) -> Iterator[str]:
    """A gateway run from the checkout `repo` (its stubs in build/gen) over `encoder` and `index`."""
    address = f"127.0.0.1:{_free_port()}"
    environment = {**os.environ, "PYTHONPATH": f"{repo / 'build' / 'gen'}:{repo}"}
    process = subprocess.Popen([sys.executable, "-m", "services.gateway.server", "--port", address.rsplit(":", 1)[1],
                                "--encoder", encoder, "--index", index], cwd=repo, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(address)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def _summary(runs: list[dict]) -> dict:
    qps = [run["qps"] for run in runs]
    return {"runs": runs, "qps_mean": round(sum(qps) / len(qps)), "qps_min": min(qps), "qps_max": max(qps),
            "p50_ms_mean": round(sum(run["p50_ms"] for run in runs) / len(runs), 2),
            "errors": sum(run["errors"] for run in runs)}


def bench(artifacts: str, seconds: float = 10.0, rounds: int = 3, clients: int = 16,
          baseline_repo: Path | None = None) -> dict:
    load_before = os.getloadavg()[0]
    with running_services(artifacts) as (addresses, _):
        variants = {"explain off": ("gateway", addresses["gateway"]), "explain on": ("explain", addresses["gateway"])}
        with (baseline_gateway(baseline_repo, addresses["encoder"], addresses["index"]) if baseline_repo
              else _nothing()) as baseline:
            if baseline:
                variants["baseline gateway (explain off)"] = ("gateway", baseline)
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            names = list(variants)
            for number in range(rounds):  # the order rotates, so that a drifting load weighs on all alike
                for name in names[number % len(names):] + names[:number % len(names)]:
                    kind, address = variants[name]
                    log.info("round %d/%d: %s", number + 1, rounds, name)
                    runs[name].append(load(kind, address, seconds, clients, 4))
    results = {name: _summary(found) for name, found in runs.items()}
    off, on = results["explain off"]["qps_mean"], results["explain on"]["qps_mean"]
    return {"variants": results, "on_over_off_qps": round(on / off, 2), "seconds": seconds, "rounds": rounds,
            "clients": clients, "load_average_before": load_before}


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant, alternating")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="also load a gateway run from this checkout (with its build/gen stubs), explain off")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    results = bench(args.artifacts, args.seconds, args.rounds, baseline_repo=args.baseline_repo)
    results["wall_seconds"] = round(time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({name: {k: v for k, v in r.items() if k != "runs"} for name, r in results["variants"].items()},
                     indent=2))
    print(f"explain on / off QPS: {results['on_over_off_qps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
