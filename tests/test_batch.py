"""batch-train on real photos: artifact contents, the feature cache, unreadable files, safe publishing."""

import json
import shutil

import numpy as np
import pytest

import batch.train
from batch import backbones, quality
from batch.extract import extract
from batch.images import list_images
from batch.publish import new_staging, publish, verify
from batch.train_head import HeadConfig
from services.common import artifact
from tests.conftest import TRAIN_PER_LABEL, train_options
from tests.helpers import example_manifest


def test_listing_takes_labels_from_top_level_folders_only(tmp_path):
    for name in ["loose.jpg", "cat/a.jpg", "cat/more/b.jpg", ".hidden/c.jpg", "dog/.d.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    records = {r.id: r.label for r in list_images(tmp_path)}
    assert records == {"loose.jpg": None, "cat/a.jpg": "cat", "cat/more/b.jpg": "cat"}


def test_artifact_is_complete_and_its_checksums_hold(artifact_root, cifar):
    version = artifact.resolve(artifact_root)
    assert (artifact_root / artifact.CURRENT).is_symlink()
    manifest = artifact.read_manifest(version)
    assert manifest.dimension == 50 and manifest.word_vectors.vocabulary == 400_000
    assert manifest.backbone.name == "efficientnet-lite0"
    assert manifest.indexes["images"].size == 10 * TRAIN_PER_LABEL
    assert manifest.labels == sorted(p.name for p in (cifar / "train").iterdir())
    assert verify(version) == []
    report = json.loads((version / artifact.REPORT).read_text())
    assert report["validation"]["label_hit1"] > 0.5  # ten labels: chance is 0.1
    assert not list(artifact_root.glob(".staging-*"))


def test_rerun_uses_the_cache_and_moves_current(artifact_root, cache_dir, cifar, tmp_path):
    """Same images and cache as the session artifact: nothing is extracted again."""
    options = train_options(cifar / "train", tmp_path / "artifacts", cache_dir, head=HeadConfig(epochs=1))
    first = batch.train.run(options)
    second = batch.train.run(options)
    report = json.loads((second / artifact.REPORT).read_text())
    assert report["images"]["extracted_now"] == 0
    assert report["images"]["from_cache"] == 10 * TRAIN_PER_LABEL
    assert artifact.resolve(tmp_path / "artifacts") == second != first
    assert first.is_dir()  # the previous version stays for services still using it
    # The 400,000-word index is built once per word-vector file and linked from the cache after that.
    words = [second / artifact.INDEXES / "words" / "vectors.npy", first / artifact.INDEXES / "words" / "vectors.npy"]
    cached = [folder / "vectors.npy" for folder in (cache_dir / "word-indexes").iterdir() if folder.name[0] != "."]
    assert any(all(c.samefile(w) for w in words) for c in cached)


@pytest.fixture
def messy_dataset(cifar, tmp_path):
    root = tmp_path / "messy"
    for label in ("cat", "ship"):
        (root / label).mkdir(parents=True)
        for photo in sorted((cifar / "train" / label).iterdir())[:12]:
            shutil.copy(photo, root / label / photo.name)
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "ship" / "notes.txt").write_text("not an image")
    good = (root / "ship" / "0000.jpg").read_bytes()
    (root / "ship" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


@pytest.mark.slow  # batch-train runs: Ray, the backbone's ONNX export, extraction
def test_unreadable_files_are_skipped_and_listed(messy_dataset, ray_runtime, cache_dir, tmp_path):
    out = tmp_path / "artifacts"
    version = batch.train.run(train_options(messy_dataset, out, cache_dir, limit_per_label=0, head=HeadConfig(epochs=3)))
    unreadable = (version / artifact.UNREADABLE).read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in unreadable) == ["notes.txt", "truncated.jpg", "zero.jpg"]
    manifest = artifact.read_manifest(version)
    assert manifest.indexes["images"].size == 24
    assert json.loads((version / artifact.REPORT).read_text())["images"]["unreadable"] == 3


@pytest.mark.slow  # two batch-train runs
def test_a_failure_before_publishing_leaves_the_previous_artifact(messy_dataset, ray_runtime, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifacts"
    first = batch.train.run(train_options(messy_dataset, out, cache_dir, limit_per_label=0, head=HeadConfig(epochs=1)))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(batch.train, "build_indexes", broken)
    with pytest.raises(OSError, match="disk full"):
        batch.train.run(train_options(messy_dataset, out, cache_dir, limit_per_label=0, head=HeadConfig(epochs=1)))
    assert artifact.resolve(out) == first and verify(first) == []
    assert not list(out.glob(".staging-*"))


def test_labels_without_word_vectors_are_named(tmp_path, cache_dir, cifar):
    root = tmp_path / "odd"
    for label in ("cat", "qqxzzy"):
        (root / label).mkdir(parents=True)
        shutil.copy(sorted((cifar / "train" / "cat").iterdir())[0], root / label / "a.jpg")
    with pytest.raises(ValueError, match="qqxzzy"):
        batch.train.run(train_options(root, tmp_path / "a", cache_dir, limit_per_label=0))


def test_label_vectors_average_multi_word_labels():
    words = batch.train.word_vectors.WordVectors(["golden", "retriever"], np.eye(2, dtype=np.float32), "test")
    np.testing.assert_allclose(quality.label_matrix(["golden_retriever"], words.index(), words.vectors),
                               [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


def test_publishing_keeps_the_three_newest_versions(tmp_path):
    """Older versions beyond the newest three are removed when a new one is published."""
    root = tmp_path / "artifacts"
    older = [f"2000010{day}T000000Z-aaaaaa" for day in range(1, 5)]  # version names sort by time
    for name in older:
        (root / name).mkdir(parents=True)
        (root / name / artifact.MANIFEST).write_text("{}")
    (root / artifact.CURRENT).symlink_to(older[-1])
    staging = new_staging(root)
    (staging / "data.txt").write_text("new")
    new = publish(staging, root, example_manifest())
    kept = sorted(p.name for p in root.iterdir() if p.name != artifact.CURRENT)
    assert kept == [older[2], older[3], new.name] == sorted(kept)
    assert artifact.resolve(root) == new


def test_index_data_is_read_recursively(artifact_root, ray_runtime, cache_dir, cifar, tmp_path):
    """--index-data: every image below the folder, at any depth, is made searchable (labels from the
    top-level folder, none for loose files)."""
    searchable = tmp_path / "searchable"
    photos = {"loose.jpg": "ship/0000.jpg", "cats/b.jpg": "cat/0000.jpg", "cats/deeper/still/c.jpg": "cat/0001.jpg",
              "x/y/z/truck.jpg": "truck/0000.jpg"}
    for name, source in photos.items():
        (searchable / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cifar / "test" / source, searchable / name)
    version = batch.train.run(train_options(cifar / "train", tmp_path / "artifacts", cache_dir, index_data=searchable,
                                            head=HeadConfig(epochs=1)))
    items = [json.loads(line) for line in (version / artifact.INDEXES / "images" / "items.jsonl").read_text().splitlines()]
    assert {item["id"]: item.get("label") for item in items} == \
           {"loose.jpg": None, "cats/b.jpg": "cats", "cats/deeper/still/c.jpg": "cats", "x/y/z/truck.jpg": "x"}
    assert artifact.read_manifest(version).indexes["images"].size == 4


def test_a_changed_image_is_extracted_again(artifact_root, ray_runtime, cifar, tmp_path):
    """The feature cache is keyed by the file's path, size and mtime: new bytes at the same path are
    extracted again, an unchanged file comes from the cache."""
    backbone = artifact.resolve(artifact_root) / artifact.BACKBONE
    preprocessing = backbones.spec("efficientnet-lite0").preprocessing
    photos, cache = tmp_path / "photos", tmp_path / "cache"
    photos.mkdir()
    ship, cat = cifar / "test" / "ship" / "0000.jpg", cifar / "test" / "cat" / "0000.jpg"
    assert ship.stat().st_size != cat.stat().st_size
    shutil.copy(ship, photos / "a.jpg")
    shutil.copy(cat, photos / "b.jpg")
    first = extract(list_images(photos), "efficientnet-lite0", backbone, preprocessing, cache)
    assert first.extracted == 2
    shutil.copy(cat, photos / "a.jpg")  # the same path, other bytes
    again = extract(list_images(photos), "efficientnet-lite0", backbone, preprocessing, cache)
    assert again.extracted == 1
    a, b = str(photos / "a.jpg"), str(photos / "b.jpg")
    np.testing.assert_allclose(again.features[a], first.features[b], atol=1e-5)
    np.testing.assert_array_equal(again.features[b], first.features[b])
    assert np.abs(first.features[a] - first.features[b]).max() > 0.1
