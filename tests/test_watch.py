"""Keeping a watched folder and the collection in step, on the real services and real photos: a photo
copied in becomes searchable, a changed one is replaced, a deleted one is gone; a watcher started later
reconciles what changed while none ran; ids are the ones `make index` gives the same files."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from batch.images import list_images
from services.common.wait_ready import wait_serving
from services.gateway import server as gateway_server
from services.gateway.client import Client
from services.gateway.watch import FolderWatcher
from tests.conftest import REPO, Addresses, serving

DEADLINE = 60.0  # seconds: an upper bound on a loaded 2-core machine, never a pause; the target is 5 s


@pytest.fixture(scope="module")
def backends(artifact_root, tmp_path_factory) -> Addresses:
    """A gateway over index and encoder services of a private copy of the session artifact (live adds write to it)."""
    root = tmp_path_factory.mktemp("watch") / "artifacts"
    shutil.copytree(artifact_root, root, symlinks=True)
    with serving(root) as addresses:
        yield addresses


@pytest.fixture(scope="module")
def client(backends):
    with Client(backends.gateway) as client:
        yield client


@contextmanager
def watching(client: Client, folder: Path, **options):
    """A watcher thread on `folder`, ready (its start-up reconcile applied); stopped and joined after."""
    watcher = FolderWatcher(client, folder, **options)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), name="folder-watcher")
    thread.start()
    try:
        assert watcher.ready.wait(DEADLINE), "the watcher did not finish its start-up reconcile"
        yield watcher
    finally:
        stop.set()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the watcher did not stop"


def seconds_until(check) -> float:
    """Poll `check()` until it is true; how long that took (fails after DEADLINE)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < DEADLINE, "not in step within the deadline"
        time.sleep(0.05)
    return time.monotonic() - started


def finds(client: Client, photo: bytes, item_id: str) -> bool:
    """Whether a search with the photo itself finds `item_id` as (one of) the same image; not yet while the
    client's channel is still reconnecting to a restarted gateway (UNAVAILABLE)."""
    try:
        return any(hit.id == item_id and hit.score > 0.999 for hit in client.similar(photo, k=5))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return False
        raise


def held(client: Client, folder: Path) -> dict[str, str | None]:
    """The ids (and labels) the index holds from the watched folder: its files, or ids it added by path."""
    return {hit.id: hit.label for hit in client.all_images()
            if not hit.id.startswith("added/") and (hit.path.startswith(str(folder)) or "/live/images/" in hit.path)}


def as_make_index_names_them(folder: Path) -> dict[str, str | None]:
    return {record.id: record.label for record in list_images(folder)}


def copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def test_a_watched_folder_stays_in_step_with_the_collection(client, real_photos, tmp_path):
    dogs, fish = sorted((real_photos / "dog").iterdir()), sorted((real_photos / "goldfish").iterdir())
    folder = tmp_path / "photos"
    for number in range(2):
        copy(dogs[number], folder / "dog" / f"watched-{number}.jpg")
        copy(fish[number], folder / "goldfish" / f"watched-{number}.jpg")
    copy(fish[2], folder / "loose.jpg")

    with watching(client, folder, rescan_seconds=0) as watcher:
        assert held(client, folder) == as_make_index_names_them(folder) == {
            "dog/watched-0.jpg": "dog", "dog/watched-1.jpg": "dog", "goldfish/watched-0.jpg": "goldfish",
            "goldfish/watched-1.jpg": "goldfish", "loose.jpg": None}

        copy(dogs[2], folder / "dog" / "new.jpg")  # a photo copied in, beside a file that is no image
        (folder / "dog" / "notes.txt").write_text("not a photo")
        added_after = seconds_until(lambda: finds(client, dogs[2].read_bytes(), "dog/new.jpg"))
        assert client.image("dog/new.jpg").label == "dog"
        seconds_until(lambda: watcher.applied["refused"] == 1)
        assert "dog/notes.txt" not in held(client, folder)

        copy(fish[3], folder / "dog" / "watched-1.jpg")  # changed: the new photo replaces the old one
        seconds_until(lambda: finds(client, fish[3].read_bytes(), "dog/watched-1.jpg"))
        assert not finds(client, dogs[1].read_bytes(), "dog/watched-1.jpg")

        (folder / "dog" / "new.jpg").unlink()
        deleted_after = seconds_until(lambda: not finds(client, dogs[2].read_bytes(), "dog/new.jpg"))
        with pytest.raises(grpc.RpcError) as error:
            client.image("dog/new.jpg")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

        shutil.rmtree(folder / "goldfish")  # a whole sub-folder removed
        seconds_until(lambda: "goldfish/watched-0.jpg" not in held(client, folder))
        assert held(client, folder) == {"dog/watched-0.jpg": "dog", "dog/watched-1.jpg": "dog", "loose.jpg": None}
    print(f"\nsearchable {added_after:.2f} s after the copy; gone {deleted_after:.2f} s after the delete")

    # While no watcher runs: one photo removed, one added, one changed. The next one reconciles at start.
    (folder / "loose.jpg").unlink()
    copy(fish[4], folder / "fish" / "late.jpg")
    copy(dogs[3], folder / "dog" / "watched-0.jpg")
    with watching(client, folder, rescan_seconds=0):
        readable = {i: label for i, label in as_make_index_names_them(folder).items() if i != "dog/notes.txt"}
        assert held(client, folder) == readable == {
            "dog/watched-0.jpg": "dog", "dog/watched-1.jpg": "dog", "fish/late.jpg": "fish"}
        assert finds(client, fish[4].read_bytes(), "fish/late.jpg")
        assert finds(client, dogs[3].read_bytes(), "dog/watched-0.jpg")


def test_make_watch_runs_until_sigterm(backends, client, real_photos, tmp_path):
    """`python -m services.gateway.watch DIR --gateway ADDRESS`, what `make watch` runs, as a user starts it."""
    folder, log = tmp_path / "photos", tmp_path / "watch.log"
    copy(sorted((real_photos / "fox").iterdir())[0], folder / "fox" / "first.jpg")
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "services.gateway.watch", str(folder), "--gateway", backends.gateway],
                                   cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        seconds_until(lambda: "in step" in log.read_text() or process.poll() is not None)
        assert process.poll() is None, log.read_text()
        assert held(client, folder) == {"fox/first.jpg": "fox"}
        photo = sorted((real_photos / "fox").iterdir())[1]
        copy(photo, folder / "fox" / "second.jpg")
        seconds_until(lambda: finds(client, photo.read_bytes(), "fox/second.jpg"))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0, log.read_text()
    assert "stopped watching" in log.read_text()


def test_changes_wait_while_the_gateway_is_down(backends, real_photos, tmp_path):
    """A change made while the gateway is away is applied once it is back, with nothing lost."""
    lions, folder = sorted((real_photos / "lion").iterdir()), tmp_path / "photos"
    copy(lions[0], folder / "lion" / "first.jpg")
    first = ExitStack()
    _, port = first.enter_context(gateway_server.run_server(0, backends.encoder, backends.index))
    address = f"127.0.0.1:{port}"
    wait_serving(address)
    with Client(address, timeout=5) as client, watching(client, folder, rescan_seconds=0) as watcher:
        first.close()  # the gateway stops
        copy(lions[1], folder / "lion" / "while-down.jpg")
        seconds_until(lambda: watcher.failing)
        with gateway_server.run_server(port, backends.encoder, backends.index):  # back, at the same address
            wait_serving(address)
            seconds_until(lambda: finds(client, lions[1].read_bytes(), "lion/while-down.jpg"))
            seconds_until(lambda: not watcher.failing)
            assert held(client, folder) == {"lion/first.jpg": "lion", "lion/while-down.jpg": "lion"}


def test_a_missing_folder_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "services.gateway.watch", str(tmp_path / "nowhere")], cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 2 and "folder to watch not found" in done.stderr
