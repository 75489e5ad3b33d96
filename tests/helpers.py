"""Helpers shared by the test modules: the status of a gRPC call, and service processes on ports
that they bind themselves (port 0) and report, so that no test picks a port another process may take."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc

from batch import wordnet
from services.common import artifact
from services.common.wait_ready import wait_serving

REPO = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on \S+:(\d+)")


def status_of(call, *args, timeout: float = 30, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status code and details a gRPC call ends with: (OK, "") when it answers."""
    try:
        call(*args, timeout=timeout, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


@contextmanager
def service_process(module: str, *arguments: str, log: Path, port: int = 0,
                    timeout: float = 180) -> Iterator[tuple[subprocess.Popen, int]]:
    """`python -m module --port PORT ...` as its own process group, so that a test can SIGKILL it.

    With port 0 the server binds a free port itself; the port is read from its "listening on" log line
    (stderr goes to `log`). Yields once the service's health says SERVING; fails with the log's tail if
    the process exits first. Killed (SIGKILL) on exit if still running."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *arguments], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    try:
        bound = _bound_port(process, log, start, timeout)
        wait_serving(f"127.0.0.1:{bound}", timeout=timeout)
        yield process, bound
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _bound_port(process: subprocess.Popen, log: Path, start: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as text:
            text.seek(start)
            found = _LISTENING.search(text.read().decode(errors="replace"))
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args)} exited ({process.returncode}) before listening:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{' '.join(process.args)} not listening after {timeout} s")
        time.sleep(0.05)


ANIMAL = "00015388"  # WordNet 3.0 noun synset: animal, animate being, beast, brute, creature, fauna


class Kinds:
    """Which words WordNet places under a synset ("is a cat an animal?"), a plural read as its singular."""

    def __init__(self, names: wordnet.WordNet | None = None):
        self.names = names or wordnet.load()
        self.synsets: dict[str, list[str]] = {}
        for offset, synset in self.names.synsets.items():
            for word in synset.words:
                self.synsets.setdefault(word.lower(), []).append(offset)

    def is_a(self, word: str, ancestor: str) -> bool:
        offsets = self.synsets.get(word) or (self.synsets.get(word[:-1], []) if word.endswith("s") else [])
        return any(o == ancestor or ancestor in self.names.ancestors(o) for o in offsets)


def example_manifest() -> artifact.Manifest:
    """A complete manifest with made-up values, for tests of reading, writing and publishing."""
    return artifact.Manifest(
        created="2026-01-01T00:00:00Z", versions={"numpy": "2.0"},
        backbone=artifact.Backbone("efficientnet-lite0", "packaged", 1280, {"size": 224}),
        word_vectors=artifact.WordSpace("glove-6b-50d", 50, 400_000), dimension=50, labels=["cat", "dog"],
        head=artifact.HeadInfo({"epochs": 25, "seed": 3}, 0.75), modes={"default": "gated"},
        quality=artifact.QualityInfo(["cat"], 3, 0.1), data=artifact.DataInfo("/data", "/data", None),
        indexes={"images": artifact.IndexInfo(10, 50, 1, {"brute_force": True})},
        version="20260101T000000Z-abcdef", files={"head.npz": "0" * 64},
    )
