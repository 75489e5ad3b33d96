"""The live log and the live image index as pure cores: deletes that stay cheap, bad lines that are
skipped, entries never skipped, concurrent writers that lose nothing, compaction."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import sys
import time

import numpy as np
import pytest

from services.common.ids import image_id
from services.common.items import Item
from services.index import live
from services.common.shards import shard_of
from services.index.core import ShardedIndex, VectorIndex
from tests.conftest import REPO

SPACE = "test:16"
N, K = 19_000, 10  # below 20,000: exact brute force


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class CountingSearcher:
    """Wraps the real ScaNN searcher to record how many neighbours each search asks for."""

    def __init__(self, searcher):
        self.searcher, self.asked = searcher, []

    def search(self, query, final_num_neighbors, **kwargs):
        self.asked.append(final_num_neighbors)
        return self.searcher.search(query, final_num_neighbors=final_num_neighbors, **kwargs)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return unit(np.random.default_rng(0).standard_normal((N, 16)))


def base_index(vectors) -> VectorIndex:
    return VectorIndex.build("images", vectors, [Item(f"img/{i}", f"img/{i}.jpg") for i in range(len(vectors))])


def test_ten_thousand_deletes_keep_each_search_cheap(vectors, tmp_path):
    base = base_index(vectors)
    images = live.LiveImages(base, tmp_path, SPACE)
    queries = unit(np.random.default_rng(1).standard_normal((200, 16)))

    def timed() -> float:
        started = time.perf_counter()
        for query in queries:
            images.search(query, K)
        return time.perf_counter() - started

    timed()  # warm up
    before = timed()
    deleted = np.random.default_rng(2).choice(N, 10_000, replace=False)  # more than half
    for chunk in np.array_split(deleted, 10):
        images.delete([f"img/{i}" for i in chunk])
    counting = base.searcher = CountingSearcher(base.searcher)
    after = timed()
    print(f"\n200 searches, k={K}: {after / before:.2f}x the time after 10,000 deletes")

    kept, gone = np.setdiff1d(np.arange(N), deleted), {f"img/{i}" for i in deleted}
    for query in queries[:20]:  # still the exact top k of what is left
        hits = images.search(query, K)
        assert len(hits) == K and not {hit.item.id for hit in hits} & gone
        np.testing.assert_allclose([hit.score for hit in hits], np.sort(vectors[kept] @ query)[::-1][:K], atol=1e-5)
    # the work per search depends on k, not on the 10,000 deletes (before: k + 10,000 for every search)
    assert max(counting.asked) <= 16 * (K + 16)
    assert sorted(counting.asked)[len(counting.asked) // 2] <= 4 * (K + 16)


def test_deleting_an_added_image_leaves_nothing_to_hide(vectors, tmp_path):
    images = live.LiveImages(base_index(vectors[:100]), tmp_path, SPACE)
    data = [f"image {i}".encode() for i in range(50)]
    ids = images.add([(image_id(d), d, vectors[200 + i], None) for i, d in enumerate(data)])
    images.delete(ids)
    assert images._delta.deleted == frozenset() and len(images) == 100


def add_line(data: bytes, vector=(1.0,) + (0.0,) * 15, **changes) -> str:
    vector = vector.tolist() if isinstance(vector, np.ndarray) else vector
    entry = {"op": "add", "id": image_id(data), "file": f"images/{'0' * 64}", "vector": vector,
             "space": SPACE, **changes}
    return json.dumps(entry)


@pytest.mark.parametrize("bad", [
    "[1, 2, 3]", '"add"', "null", '{"op": "rename", "id": "img/1"}', '{"op": "delete", "id": 5}',
    '{"op": "delete"}', add_line(b"x", vector="abc"), add_line(b"x", vector=[1, "a"]),
    add_line(b"x", vector=[]), add_line(b"x", label=7), add_line(b"x", file="../../etc/passwd"),
    add_line(b"x", id="img/../x"), add_line(b"x", space=3),
])
def test_a_malformed_json_line_is_skipped_with_a_warning(vectors, tmp_path, caplog, bad):
    directory = live.live_dir(tmp_path)
    directory.mkdir()
    good = [add_line(b"first", vectors[0]), bad, add_line(b"second", vectors[1]), '{"op": "delete", "id": "img/3"}']
    (directory / live.LOG_NAME).write_text("\n".join(good) + "\n")
    with caplog.at_level(logging.WARNING, logger="services.index.live"):
        images = live.LiveImages(base_index(vectors[:10]), tmp_path, SPACE)
    assert images.contains(image_id(b"first")) and images.contains(image_id(b"second"))
    assert not images.contains("img/3") and images.contains("img/4")
    assert "skipping a line that is not a log entry" in caplog.text


def test_entries_that_failed_to_apply_are_read_again(vectors, tmp_path, monkeypatch):
    images = live.LiveImages(base_index(vectors[:10]), tmp_path, SPACE)
    images.log.append([live.Entry("delete", "img/1"), live.Entry("delete", "img/2")])
    real_apply = live.LiveImages._apply

    def fail_once(self, entries):
        monkeypatch.setattr(live.LiveImages, "_apply", real_apply)
        raise MemoryError("simulated failure while applying")

    monkeypatch.setattr(live.LiveImages, "_apply", fail_once)
    with pytest.raises(MemoryError):
        images.refresh()
    assert images.contains("img/1")
    assert images.refresh() == 2
    assert not images.contains("img/1") and not images.contains("img/2")


WRITER = """
import sys
from pathlib import Path
from services.common.ids import image_id
from services.index import live
root, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
log = live.LiveLog(root)
print("ready", flush=True)
sys.stdin.readline()
for number in range(count):
    data = f"{name}-{number}".encode()
    vector = tuple(float(v) for v in range(300))  # lines of several kB, longer than an atomic pipe write
    log.append([live.Entry("add", image_id(data), name, log.store_image(data), vector, "test:300")])
"""


def test_two_replicas_appending_at_once_lose_no_entry(tmp_path):
    count = 300
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(count)], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:  # both start together
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        assert writer.wait(timeout=300) == 0
    entries, _ = live.LiveLog(tmp_path).read()
    expected = {image_id(f"{name}-{n}".encode()) for name in ("a", "b") for n in range(count)}
    assert len(entries) == 2 * count and {e.id for e in entries} == expected
    assert all(len(e.vector) == 300 for e in entries)


def test_deleted_images_take_their_bytes_with_them(vectors, tmp_path):
    images = live.LiveImages(base_index(vectors[:10]), tmp_path, SPACE)
    kept, gone = b"kept image", b"deleted image"
    ids = images.add([(image_id(d), d, vectors[20 + i], "cat") for i, d in enumerate((kept, gone))])
    images.delete([ids[1]])
    stored = live.live_dir(tmp_path)
    assert (stored / live.image_file(kept)).is_file() and not (stored / live.image_file(gone)).exists()
    images.add([(ids[1], gone, vectors[21], None)])  # adding it again stores it again
    assert (stored / live.image_file(gone)).is_file() and images.contains(ids[1])


def test_compaction_keeps_what_replaying_gives_and_replicas_follow(vectors, tmp_path, monkeypatch):
    monkeypatch.setattr(live, "COMPACT_AFTER_LINES", 100)
    writer = live.LiveImages(base_index(vectors[:50]), tmp_path, SPACE)
    reader = live.LiveImages(base_index(vectors[:50]), tmp_path, SPACE)  # another replica on the same log
    data = [f"image {i}".encode() for i in range(30)]
    ids = [image_id(d) for d in data]
    for round_ in range(4):  # the same images added and deleted again and again: 240 lines, 30 ids
        writer.add([(image_id(d), d, vectors[100 + i], None) for i, d in enumerate(data)])
        writer.delete(ids[: 20 if round_ < 3 else 10])
    writer.delete(["img/1", "img/2"])
    log = live.LiveLog(tmp_path)
    assert len(log.path.read_text().splitlines()) < 100  # 192 lines written: compacted when 100 were due
    assert log.compact(gc_age_seconds=0)[1] == 32  # one line per id
    fresh = live.LiveImages(base_index(vectors[:50]), tmp_path, SPACE)
    reader.refresh()
    for images in (fresh, reader, writer):
        assert [images.contains(i) for i in ids] == [False] * 10 + [True] * 20
        assert not images.contains("img/1") and images.contains("img/3") and len(images) == 48 + 20
    stored = sorted(p.name for p in (live.live_dir(tmp_path) / live.IMAGES_DIR).iterdir())
    assert stored == sorted(live.image_file(d).split("/")[1] for d in data[10:])


def test_appends_racing_a_compaction_lose_nothing(tmp_path):
    log = live.LiveLog(tmp_path)
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            for number in range(200):
                data = f"{name}-{number}".encode()
                log.append([live.Entry("add", image_id(data), None, live.image_file(data), (1.0,), "t:1")],
                           images=[data])
        except BaseException as error:  # reported below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(name,)) for name in "ab"]
    for writer in writers:
        writer.start()
    while any(w.is_alive() for w in writers):
        log.compact(gc_age_seconds=0)
    for writer in writers:
        writer.join()
    log.compact(gc_age_seconds=0)
    assert errors == []
    assert {e.id for e in log.read()[0]} == {image_id(f"{n}-{i}".encode()) for n in "ab" for i in range(200)}
    assert len(list((live.live_dir(tmp_path) / live.IMAGES_DIR).iterdir())) == 400


def labelled_index(vectors) -> VectorIndex:
    """A base index whose ids are paths under two folders, as `make index` names a folder's files."""
    return VectorIndex.build("images", vectors, [Item(f"{'ab'[i % 2]}/{i:03d}.jpg", f"/photos/{'ab'[i % 2]}/{i:03d}.jpg",
                                                      "ab"[i % 2]) for i in range(len(vectors))])


def pages(images, folder: str, size: int) -> list[str]:
    """Every id under `folder`, listed `size` at a time."""
    ids, after = [], ""
    while True:
        page = images.list_items(folder, after, size)
        ids += [item.id for item in page]
        if len(page) < size:
            return ids
        after = page[-1].id


def test_a_path_id_is_added_replaced_listed_and_deleted(vectors, tmp_path):
    base = labelled_index(vectors[:60])
    images = live.LiveImages(base, tmp_path, SPACE)
    assert pages(images, "", 7) == sorted(item.id for item in base.items)
    assert pages(images, "a/", 1000) == sorted(item.id for item in base.items if item.label == "a")

    new, changed = vectors[100], vectors[101]
    images.add([("a/new.jpg", b"a new photo", new, "a"), ("b/001.jpg", b"a changed photo", changed, "b")])
    assert len(images) == 61 and pages(images, "a/", 4)[-1] == "a/new.jpg" and pages(images, "", 7).count("b/001.jpg") == 1
    assert images.search(new, 1)[0].item.id == "a/new.jpg"
    top = images.search(changed, 1)[0]  # the changed photo replaced the artifact's image of that id
    assert top.item.id == "b/001.jpg" and top.score > 0.999
    assert top.item.path.endswith(live.image_file(b"a changed photo", "b/001.jpg"))
    assert all(hit.item.id != "b/001.jpg" for hit in images.search(vectors[1], 60, min_score=0.999))

    stored = live.live_dir(tmp_path)
    first_copy = stored / live.image_file(b"a changed photo", "b/001.jpg")
    images.add([("b/001.jpg", b"changed again", vectors[102], "b")])  # its earlier copy goes
    assert not first_copy.exists() and images.search(vectors[102], 1)[0].item.id == "b/001.jpg"
    images.delete(["b/001.jpg", "a/new.jpg"])
    assert len(images) == 59 and not images.contains("b/001.jpg") and "a/new.jpg" not in pages(images, "", 1000)
    assert list((stored / live.IMAGES_DIR).iterdir()) == []

    replayed = live.LiveImages(base, tmp_path, SPACE)  # a restart replays the log to the same membership
    assert pages(replayed, "", 1000) == pages(images, "", 1000)


def test_an_add_the_artifact_folded_in_keeps_the_artifacts_vector(vectors, tmp_path):
    """make index and batch-train fold the log in and embed the stored copy with their model: that vector
    wins over the log's. A different copy (the file changed since) still replaces the artifact's."""
    live.LiveImages(labelled_index(vectors[:10]), tmp_path, SPACE).add([("a/new.jpg", b"photo", vectors[100], "a")])
    stored_copy = str(live.live_dir(tmp_path) / live.image_file(b"photo", "a/new.jpg"))
    for path, expected in ((stored_copy, vectors[200]), ("/photos/a/new.jpg", vectors[100])):
        artifact = VectorIndex.build("images", np.stack([vectors[200], vectors[1]]),
                                     [Item("a/new.jpg", path, "a"), Item("b/001.jpg", "/photos/b/001.jpg", "b")])
        images = live.LiveImages(artifact, tmp_path, SPACE)
        assert np.allclose(images.vector_of("a/new.jpg"), expected, atol=1e-6) and len(images) == 2


@pytest.mark.parametrize("given, problem", [
    ("../outside.jpg", "relative path"), ("/etc/passwd", "relative path"), ("a//b.jpg", "relative path"),
    ("added/0123", "content id"), ("a\\b.jpg", "backslash"), ("", "empty"), ("x" * 1001, "at most 1000"),
])
def test_a_given_id_must_be_a_plain_relative_path(vectors, tmp_path, given, problem):
    images = live.LiveImages(labelled_index(vectors[:10]), tmp_path, SPACE)
    with pytest.raises(live.InvalidQuery, match=problem):
        images.add([(given, b"photo", vectors[100], None)])
    assert len(images) == 10 and not live.live_dir(tmp_path).joinpath(live.LOG_NAME).exists()


def test_shards_list_as_the_one_index(vectors):
    whole = labelled_index(vectors[:90])
    owners = [shard_of(item.id, 3) for item in whole.items]
    sharded = ShardedIndex("images", [VectorIndex.build("images", vectors[:90][[o == n for o in owners]],
                                                        [i for i, o in zip(whole.items, owners) if o == n])
                                      for n in range(3)])
    assert pages(sharded, "", 7) == pages(whole, "", 1000) == sorted(item.id for item in whole.items)
    assert pages(sharded, "b/", 4) == pages(whole, "b/", 4) == [i.id for i in sorted(whole.items, key=lambda i: i.id)
                                                               if i.label == "b"]
