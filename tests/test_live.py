"""Live updates and artifact switches on the real services: nothing acknowledged is lost, no query fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from batch.train import run
from batch.train_head import HeadConfig
from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import artifact
from services.common.ids import ID_PREFIX, image_id
from services.common.wait_ready import wait_serving
from services.encoder import server as encoder_server
from services.gateway import server as gateway_server
from services.gateway.client import Client
from services.index import live
from services.index import server as index_server
from tests.conftest import train_options
from tests.helpers import service_process

CLI = [sys.executable, "-m", "services.gateway.cli"]
PHOTO = "test/ship/0003.jpg"  # not among the session artifact's searchable (training) images
DELETED = "truck/0001.jpg"  # one of them, deleted through the live log before next_version is trained


@pytest.fixture
def root(artifact_root, tmp_path) -> Path:
    """A private copy of the session artifact root, free to be changed."""
    copy = tmp_path / "artifacts"
    shutil.copytree(artifact_root, copy, symlinks=True)
    return copy


def index_process(root: Path, port: int = 0):
    """The index service as its own process, so that a test can SIGKILL it; port 0: one it picks."""
    return service_process("services.index.server", "--artifacts", str(root), "--reload-seconds", "0.5",
                           log=root.parent / "index.log", port=port)


def _eventually(check, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except (grpc.RpcError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_added_images_survive_a_killed_index_and_deletes_stick(root, cifar):
    photo = (cifar / PHOTO).read_bytes()
    first_index = ExitStack()
    first, index_port = first_index.enter_context(index_process(root))  # restarted below on the same port
    with first_index, encoder_server.run_server(0, str(root)) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}", timeout=5.0) \
            as (_, gateway_port), Client(f"127.0.0.1:{gateway_port}") as client:
        for port in (encoder_port, gateway_port):  # loading takes as long as the machine makes it
            wait_serving(f"127.0.0.1:{port}")
        before = client.similar(photo, k=1)[0]
        assert not before.id.startswith(ID_PREFIX)
        [added] = client.add_images([photo], ["ship"])
        assert added == image_id(photo)
        top = client.similar(photo, k=1)[0]  # searchable at once
        assert (top.id, top.label) == (added, "ship") and top.score > 0.999
        os.killpg(first.pid, signal.SIGKILL)  # right after the add was acknowledged
        first_index.close()
        with index_process(root, index_port):
            top = _eventually(lambda: client.similar(photo, k=1)[0])
            assert top.id == added and top.score > 0.999
            assert [hit.id for hit in client.similar(id=added, k=3)] == \
                   [hit.id for hit in client.similar(photo, k=4)][1:]
            image = client.image(added)  # where the web service finds the added photo's bytes
            assert image.label == "ship" and Path(image.path).read_bytes() == photo
            assert client.add_images([photo]) == [added]  # the same bytes again: same id, no duplicate
            assert [hit.id for hit in client.similar(photo, k=2)].count(added) == 1
            assert client.delete_images([added, before.id]) == 2
            with pytest.raises(grpc.RpcError) as error:
                client.delete_images([before.id, "no/such.jpg"])
            assert error.value.code() == grpc.StatusCode.NOT_FOUND and "no/such.jpg" in error.value.details()
            with pytest.raises(grpc.RpcError) as error:
                client.image(added)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with index_process(root, index_port):
            ids = [hit.id for hit in _eventually(lambda: client.similar(photo, k=20))]
            assert added not in ids and before.id not in ids
    stored = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                    and not p.is_relative_to(artifact.resolve(root)))
    # written there and nowhere else; the deleted image's bytes went with it
    assert stored == [f"live/{live.LOG_NAME}", f"live/{live.LOCK_NAME}"]
    entries = [json.loads(line) for line in (root / live.LIVE_DIR / live.LOG_NAME).read_text().splitlines()]
    assert [(e["op"], e["id"]) for e in entries] == [("add", added), ("add", added), ("delete", added),
                                                     ("delete", before.id)]


def test_bad_live_updates_get_clear_errors_and_change_nothing(root):
    with index_server.run_server(0, str(root)) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_serving(f"127.0.0.1:{port}")
        index = index_pb2_grpc.IndexStub(channel)
        size = index.Info(index_pb2.IndexInfoRequest(index="images")).indexes[0].size
        good = index_pb2.NewImage(id=image_id(b"bytes"), image=b"bytes",
                                  vector=index_pb2.FloatVector(values=[1.0] * 50))
        cases = {
            "id not the content hash": index_pb2.NewImage(id="added/../../etc/passwd", image=b"bytes",
                                                          vector=good.vector),
            "wrong dimension": index_pb2.NewImage(id=good.id, image=b"bytes", vector=index_pb2.FloatVector(values=[1.0])),
            "NaN vector": index_pb2.NewImage(id=good.id, image=b"bytes",
                                             vector=index_pb2.FloatVector(values=[float("nan")] * 50)),
            "no bytes": index_pb2.NewImage(id=good.id, vector=good.vector),
        }
        for case, image in cases.items():
            with pytest.raises(grpc.RpcError) as error:
                index.AddImages(index_pb2.IndexAddImagesRequest(images=[good, image]))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        with pytest.raises(grpc.RpcError) as error:
            index.AddImages(index_pb2.IndexAddImagesRequest(images=[good], artifact_version="20000101T000000Z-000000"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert index.Info(index_pb2.IndexInfoRequest(index="images")).indexes[0].size == size
        assert not (root / live.LIVE_DIR).exists()  # nothing was written for a refused call


def test_images_added_and_deleted_with_the_cli(root, cifar):
    """`semsearch add` then `semsearch delete`, as a user types them, against the real services."""
    photo = cifar / PHOTO
    with index_server.run_server(0, str(root)) as (_, index_port), \
            encoder_server.run_server(0, str(root)) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}") as (_, port), \
            Client(f"127.0.0.1:{port}") as client:
        gateway = f"127.0.0.1:{port}"
        wait_serving(gateway)
        added = semsearch(gateway, "add", str(photo), "--label", "ship", "--json")
        assert added == {"added": [{"file": str(photo), "id": image_id(photo.read_bytes())}]}
        new_id = added["added"][0]["id"]
        top = client.similar(photo.read_bytes(), k=1)[0]
        assert (top.id, top.label) == (new_id, "ship") and top.score > 0.999
        assert semsearch(gateway, "delete", new_id, "--json") == {"deleted": 1}
        assert new_id not in [hit.id for hit in client.similar(photo.read_bytes(), k=20)]
        shown = subprocess.run([*CLI, "--gateway", gateway, "delete", new_id], capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 1 and shown.stderr.startswith("semsearch: NOT_FOUND") and new_id in shown.stderr


def semsearch(gateway: str, *args: str) -> dict:
    result = subprocess.run([*CLI, "--gateway", gateway, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def next_version(artifact_root, cifar, cache_dir, tmp_path_factory) -> Path:
    """A newer artifact version (another seed, a short retraining on cached features), built elsewhere;
    its root's live log had PHOTO added and DELETED deleted, which batch-train folds into the version itself."""
    elsewhere = tmp_path_factory.mktemp("next") / "artifacts"
    shutil.copytree(artifact_root, elsewhere, symlinks=True)
    log = live.LiveLog(elsewhere)
    photo = (cifar / PHOTO).read_bytes()
    log.append([live.Entry("add", image_id(photo), "ship", log.store_image(photo), (1.0,) * 50,
                           artifact.read_manifest(artifact.resolve(elsewhere)).space),
                live.Entry("delete", DELETED)])
    return run(train_options(cifar / "train", elsewhere, cache_dir, head=HeadConfig(epochs=3, seed=7)))


def publish_copy(version_dir: Path, root: Path) -> str:
    """Publish a built version into `root` as batch-train does: rename into place, then swap `current`."""
    incoming = root / f".staging-{version_dir.name}"
    shutil.copytree(version_dir, incoming)
    os.rename(incoming, root / version_dir.name)
    os.symlink(version_dir.name, root / ".current-new")
    os.replace(root / ".current-new", root / artifact.CURRENT)
    return version_dir.name


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(root, cifar, caplog):
    old = artifact.resolve(root)
    broken = old.parent / ".broken" / "20990101T000000Z-bad000"
    shutil.copytree(old, broken)
    (broken / artifact.INDEXES / "words" / "vectors.npy").unlink()
    with index_server.run_server(0, str(root), reload_seconds=0.2) as (_, index_port), \
            encoder_server.run_server(0, str(root), reload_seconds=0.2) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}") as (_, port), \
            Client(f"127.0.0.1:{port}") as client, grpc.insecure_channel(f"127.0.0.1:{index_port}") as channel:
        wait_serving(f"127.0.0.1:{port}")
        expected = [h.id for h in client.search("ship", k=5)]
        publish_copy(broken, root)
        # evidence that the index's reload check found the broken version and tried it (twice: the retry)
        _eventually(lambda: _assert_equal(max(_failed_attempts(caplog, "Index", broken.name), default=0) >= 2, True),
                    60)
        assert index_pb2_grpc.IndexStub(channel).Info(index_pb2.IndexInfoRequest()).artifact_version == old.name
        assert [h.id for h in client.search("ship", k=5)] == expected
        wait_serving(f"127.0.0.1:{port}", timeout=1)


def test_an_encoder_ahead_of_the_index_answers_on_the_index_version(root, next_version, cifar):
    """The encoder switches, the index does not (reload off): answers stay those of the old version."""
    photo = (cifar / PHOTO).read_bytes()
    old = artifact.resolve(root).name
    with index_server.run_server(0, str(root), reload_seconds=0) as (_, index_port), \
            encoder_server.run_server(0, str(root), reload_seconds=0.2) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}") as (_, port), \
            Client(f"127.0.0.1:{port}") as client, grpc.insecure_channel(f"127.0.0.1:{encoder_port}") as channel:
        wait_serving(f"127.0.0.1:{port}")
        expected = [(h.id, round(h.score, 4)) for h in client.similar(photo, k=10)]
        tags = [w.word for w in client.tag(photo, k=5)]
        new = publish_copy(next_version, root)
        encoder = encoder_pb2_grpc.EncoderStub(channel)
        _eventually(lambda: _assert_equal(encoder.Info(encoder_pb2.EncoderInfoRequest()).artifact_version, new))
        assert [(h.id, round(h.score, 4)) for h in client.similar(photo, k=10)] == expected
        assert [w.word for w in client.tag(photo, k=5)] == tags
        assert encoder.EncodeImage(encoder_pb2.EncodeImageRequest(image=photo)).artifact_version == new
        assert encoder.EncodeImage(encoder_pb2.EncodeImageRequest(image=photo, artifact_version=old)) \
                      .artifact_version == old


def _failed_attempts(caplog, service: str, version: str) -> list[int]:
    """The attempt numbers of the logged failures of `service` to load artifact `version`."""
    return [record.args[2] for record in list(caplog.records)
            if record.msg.startswith("%s: could not load artifact") and record.args[0] == service
            and str(record.args[1]).endswith(version)]


def _assert_equal(actual, expected) -> None:
    assert actual == expected, f"{actual} != {expected}"


def test_a_published_artifact_is_switched_to_under_load_with_no_failed_query(root, next_version, cifar):
    """16 clients query for 30 s while a new version (which folded in a live add) is published."""
    photo = (cifar / PHOTO).read_bytes()
    with index_server.run_server(0, str(root), reload_seconds=0.5) as (_, index_port), \
            encoder_server.run_server(0, str(root), reload_seconds=0.5) as (_, encoder_port), \
            gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}") as (_, port), \
            Client(f"127.0.0.1:{port}", timeout=30) as client:
        wait_serving(f"127.0.0.1:{port}")
        [added] = client.add_images([photo], ["ship"])
        stop, answers, failures = threading.Event(), [0], []

        def query(worker: int) -> None:
            while not stop.is_set():
                try:
                    hits = client.search("ship", k=10) if worker % 2 else client.similar(photo, k=10)
                    assert len(hits) == 10 and (worker % 2 or hits[0].id == added), hits[:1]
                    answers[0] += 1
                except Exception as error:  # every failure is a test failure, reported below
                    failures.append(repr(error))

        workers = [threading.Thread(target=query, args=(n,)) for n in range(16)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        try:
            time.sleep(5)
            new = publish_copy(next_version, root)
            with grpc.insecure_channel(f"127.0.0.1:{index_port}") as i_channel, \
                    grpc.insecure_channel(f"127.0.0.1:{encoder_port}") as e_channel:
                index, encoder = index_pb2_grpc.IndexStub(i_channel), encoder_pb2_grpc.EncoderStub(e_channel)
                _eventually(lambda: _assert_equal(index.Info(index_pb2.IndexInfoRequest()).artifact_version, new), 60)
                _eventually(lambda: _assert_equal(encoder.Info(encoder_pb2.EncoderInfoRequest()).artifact_version,
                                                  new), 60)
                switched = answers[0]
                time.sleep(max(5.0, 30 - (time.monotonic() - started)))
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        print(f"\nartifact switch under load: 16 clients, {time.monotonic() - started:.0f} s, {answers[0]} answers "
              f"({switched} before both services had switched), {len(failures)} failed")
        assert failures == []
        assert answers[0] > switched > 0
        assert json.loads((root / new / artifact.REPORT).read_text())["images"]["live_updates"] == \
               {"added": 1, "deleted": 1}
        top = client.similar(photo, k=1)[0]  # now part of the new artifact itself, embedded by its model
        assert top.id == added and top.score > 0.999
        ids = [json.loads(line)["id"] for line in
               (root / new / artifact.INDEXES / "images" / "items.jsonl").read_text().splitlines()]
        assert added in ids and DELETED not in ids  # the image deleted through the live log is left out
        with pytest.raises(grpc.RpcError) as error:
            client.image(DELETED)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(f"127.0.0.1:{index_port}") as channel:
            info = index_pb2_grpc.IndexStub(channel).Info(index_pb2.IndexInfoRequest(index="images"))
        assert info.indexes[0].size == artifact.read_manifest(root / new).indexes["images"].size == 1000
