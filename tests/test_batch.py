"""batch-train on real photos: artifact contents, the feature cache, unreadable files, safe publishing."""

import json
import shutil

import numpy as np
import pytest

import batch.train
from batch import quality
from batch.images import list_images
from batch.publish import verify
from batch.train_head import HeadConfig
from services.common import artifact
from tests.conftest import TRAIN_PER_LABEL, train_options


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
    assert manifest["dimension"] == 50 and manifest["word_vectors"]["vocabulary"] == 400_000
    assert manifest["backbone"]["name"] == "efficientnet-lite0"
    assert manifest["indexes"]["images"]["size"] == 10 * TRAIN_PER_LABEL
    assert manifest["labels"] == sorted(p.name for p in (cifar / "train").iterdir())
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
    assert manifest["indexes"]["images"]["size"] == 24
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
