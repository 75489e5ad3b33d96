"""Where the gateway's time goes under load: py-spy samples the gateway process while 8 clients search.

    python -m bench.profile_gateway [--artifacts artifacts] [--seconds 12]

Needs py-spy (the bench extra: pip install -e ".[bench]"). Prints the share of samples whose innermost frame
is in each function, largest first, and the share that is inside this repository's code at all (any frame
under services/).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.capacity import running_services
from bench.serving import load


def shares(raw: Path) -> tuple[Counter, float, int]:
    """py-spy's raw (collapsed) stacks -> (samples per innermost frame, share with a services/ frame, total)."""
    leaves, ours, total = Counter(), 0, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames, samples = stack.split(";"), int(count)
        total += samples
        leaves[frames[-1]] += samples
        ours += samples if any("services/" in frame for frame in frames) else 0
    return leaves, ours / max(total, 1), total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--seconds", type=int, default=12)
    args = parser.parse_args(argv)
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as folder, running_services(args.artifacts) as (addresses, processes):
        raw = Path(folder) / "gateway.txt"
        load("gateway", addresses["gateway"], 3, 8, 4)  # warm the channels and the text cache
        record = subprocess.Popen([spy, "record", "-p", str(processes[2].pid), "-d", str(args.seconds), "-r", "200",
                                   "-f", "raw", "-o", str(raw), "--nonblocking", "-t"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        print(load("gateway", addresses["gateway"], args.seconds, 8, 4))
        record.wait()
        leaves, ours, total = shares(raw)
    innermost = sum(samples for frame, samples in leaves.items() if "services/" in frame) / max(total, 1)
    print(f"{total} thread samples (py-spy cannot tell a thread blocked in C from a running one); {ours:.1%} have "
          f"a frame in services/ (this repository's code), {innermost:.1%} have it innermost")
    for frame, samples in leaves.most_common(15):
        print(f"{samples / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()
