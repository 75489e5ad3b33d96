"""Artifact switches where one side loads late or fails: the plumbing of `Loading` and
`follow_artifacts`, with stand-in cores (the tests are about which version answers, not about
what a core computes; test_live runs the real services across a switch)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.common import artifact
from services.common import server as common


@dataclass
class Core:
    version: str


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


class Context:
    """What Loading.get uses of a grpc.ServicerContext."""

    def __init__(self):
        self.trailing = ()

    def abort(self, code, details):
        raise Aborted(code, details)

    def set_trailing_metadata(self, metadata):
        self.trailing = metadata


def test_a_peer_that_switches_90_s_late_still_finds_the_shared_version(monkeypatch):
    encoder = common.Loading("encoder")
    encoder.install(Core("v1"))
    encoder.install(Core("v2"))  # the encoder switched; the index will take 90 s more
    later = time.monotonic() + 90
    monkeypatch.setattr(common.time, "monotonic", lambda: later)
    assert encoder.get(Context(), "v1").version == "v1"
    assert encoder.get(Context()).version == "v2"
    encoder.install(Core("v3"))  # only two versions are ever held
    with pytest.raises(Aborted) as refused:
        encoder.get(context := Context(), "v1")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(context.trailing)[common.VERSION_METADATA] == "v3"


def test_writes_go_to_the_current_version_only():
    index = common.Loading("index")
    index.install(Core("v1"))
    index.install(Core("v2"))
    with pytest.raises(Aborted) as refused:
        index.get(Context(), "v1", current_only=True)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_unavailable_names_no_internal_detail():
    loading = common.Loading("index")
    loading.error = FileNotFoundError("/srv/artifacts/20990101/indexes/words/vectors.npy")
    with pytest.raises(Aborted) as refused:
        loading.get(Context())
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "/srv" not in refused.value.details


def publish(root: Path, name: str) -> None:
    (root / name).mkdir()
    (root / name / artifact.MANIFEST).write_text("{}")
    os.symlink(name, root / ".current-new")
    os.replace(root / ".current-new", root / artifact.CURRENT)


def test_a_failed_load_is_tried_again_until_it_loads(tmp_path):
    publish(tmp_path, "v1")
    attempts: dict[str, int] = {}
    switched = threading.Event()

    def load(directory: Path) -> Core:
        attempts[directory.name] = attempts.get(directory.name, 0) + 1
        if directory.name == "v2" and attempts["v2"] < 3:
            raise OSError("the shared volume is not there yet")
        return Core(directory.name)

    class Watched(common.Loading):
        def install(self, core) -> None:
            super().install(core)
            if core.version == "v2":
                switched.set()

    loading, stop, ready = Watched("index"), threading.Event(), threading.Event()
    follower = threading.Thread(target=common.follow_artifacts,
                                args=(loading, tmp_path, load, ready.set, None, 0.01, stop))
    follower.start()
    try:
        assert ready.wait(30)
        publish(tmp_path, "v2")
        assert switched.wait(60)  # before: one failure, and v2 was never tried again
        assert loading.core.version == "v2" and attempts["v2"] == 3
        assert loading.get(Context(), "v1").version == "v1"
    finally:
        stop.set()
        follower.join()
