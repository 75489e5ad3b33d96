"""Session fixtures: one Ray runtime, one real artifact trained on a CIFAR-10 subset, in-process servers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from batch.train import Options, run
from batch.train_head import HeadConfig
from services.encoder import server as encoder_server
from services.gateway import server as gateway_server
from services.common.wait_ready import wait_serving
from services.index import server as index_server
from services.web import server as web_server

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
REAL_PHOTOS = REPO.parent / "shared" / "data" / "imagenet200"
TRAIN_PER_LABEL = 100
# Lite0, not the default Lite2: it extracts about twice as fast, and the tests check behaviour, not which backbone
# scores best (`make eval` measures the default).
TEST_BACKBONE = "efficientnet-lite0"


def pytest_collection_modifyitems(items) -> None:
    """Every test that needs the trained session artifact (directly or through `services`, `web`, ...)
    is `slow`, so that `pytest -m "not slow"` is the lane without it; others are marked by hand."""
    for item in items:
        if "artifact_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cifar() -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.fail(f"test data missing: {CIFAR} (see ../shared/data/README.md)")
    return CIFAR


@pytest.fixture(scope="session")
def real_photos() -> Path:
    if not REAL_PHOTOS.is_dir():
        pytest.fail(f"test data missing: {REAL_PHOTOS} (see ../shared/data/README.md)")
    return REAL_PHOTOS


@pytest.fixture(scope="session")
def ray_runtime():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    yield
    started = descendants(os.getpid())  # Ray's processes, which ray.init started under this one
    ray.shutdown()
    end_processes(started)  # any that outlive the shutdown (seen once: a Ray Train controller, orphaned)


def descendants(pid: int) -> set[int]:
    """The process ids under `pid`, at any depth (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def end_processes(pids: set[int], grace: float = 10.0) -> None:
    """Wait up to `grace` seconds for `pids` to exit, then kill those still running."""
    deadline = time.monotonic() + grace
    while (alive := {pid for pid in pids if _running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The feature and backbone cache. While developing, SEMSEARCH_TEST_CACHE=DIR reuses one (written to)."""
    if os.environ.get("SEMSEARCH_TEST_CACHE"):
        return Path(os.environ["SEMSEARCH_TEST_CACHE"])
    return tmp_path_factory.mktemp("cache")


def train_options(data: Path, artifacts: Path, cache: Path, **overrides) -> Options:
    defaults = dict(data=data, index_data=None, artifacts=artifacts, cache=cache, backbone=TEST_BACKBONE,
                    limit_per_label=TRAIN_PER_LABEL, head=HeadConfig(epochs=15), quality=False)
    return Options(**{**defaults, **overrides})


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory, ray_runtime, cache_dir, cifar, real_photos) -> Path:
    """A real artifact: EfficientNet-Lite0 + GloVe 6B 50d, head trained on 100 photos per class, with the
    quality extras (softmax baseline, zero-shot head, modes chosen on validation, with the validation
    half of the real photos for words never trained on) that other runs skip.

    While developing, SEMSEARCH_TEST_ARTIFACTS=DIR reuses an artifact root trained before (read-only)."""
    if os.environ.get("SEMSEARCH_TEST_ARTIFACTS"):
        return Path(os.environ["SEMSEARCH_TEST_ARTIFACTS"])
    root = tmp_path_factory.mktemp("artifacts")
    run(train_options(cifar / "train", root, cache_dir, quality=True, open_data=real_photos))
    return root


@dataclass(frozen=True)
class Addresses:
    gateway: str
    encoder: str
    index: str


@contextmanager
def serving(artifacts: Path) -> Iterator[Addresses]:
    """Index, encoder and gateway over `artifacts` on loopback ports picked by the OS, each SERVING."""
    with index_server.run_server(0, str(artifacts)) as (_, index_port), \
            encoder_server.run_server(0, str(artifacts)) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}") as (_, port):
        addresses = Addresses(f"127.0.0.1:{port}", f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}")
        for address in (addresses.index, addresses.encoder, addresses.gateway):
            wait_serving(address)
        yield addresses


@pytest.fixture(scope="session")
def services(artifact_root) -> Addresses:
    """The three real services on loopback ports picked by the OS."""
    with serving(artifact_root) as addresses:
        yield addresses


@dataclass(frozen=True)
class Web:
    url: str
    thumbnails: Path


@pytest.fixture(scope="session")
def web(services, tmp_path_factory) -> Web:
    """The web service on a loopback port picked by the OS, over the real gateway."""
    thumbnails = tmp_path_factory.mktemp("thumbnails")
    with web_server.run_server(0, services.gateway, thumbnails=thumbnails) as (_, port):
        yield Web(f"http://127.0.0.1:{port}", thumbnails)
