"""Near-duplicate search as pure cores (no artifact, no servers): the grouping against brute force, the
average-linkage rule that does not chain two photos' groups, the limits; backbone features kept with
an image index, with images added live (and replayed from the log), deleted, filtered by folder."""

from __future__ import annotations

import base64
import json
from itertools import combinations

import numpy as np
import pytest

from services.common.ids import image_id
from services.common.items import Item
from services.gateway import duplicates
from services.index import live
from services.index.core import NoFeatures, ShardedIndex, VectorIndex, unit_features

SPACE = "test:8"
BACKBONE = "net:packaged:32"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clusters(rng, groups: int, size: int, noise: float, dimension: int = 64) -> np.ndarray:
    """`groups` centers with `size` noisy copies each (non-negative, like backbone features)."""
    centers = np.abs(rng.standard_normal((groups, dimension)))
    return unit(np.repeat(centers, size, axis=0) + noise * np.abs(rng.standard_normal((groups * size, dimension))))


def brute_force_pairs(features: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    scores = features.astype(np.float32) @ features.astype(np.float32).T
    return {(i, j) for i, j in combinations(range(len(features)), 2) if scores[i, j] >= threshold}


def test_pairs_across_blocks_equal_brute_force(monkeypatch):
    monkeypatch.setattr(duplicates, "ROW_BLOCK", 7)  # many row and column blocks, none aligned
    monkeypatch.setattr(duplicates, "COLUMN_BLOCK", 11)
    features = unit_features(clusters(np.random.default_rng(0), 20, 3, 0.3))
    first, second, scores = duplicates.similar_pairs(features, 0.9)
    assert set(zip(first.tolist(), second.tolist())) == brute_force_pairs(features, 0.9) != set()
    np.testing.assert_allclose(scores, np.einsum("ij,ij->i", features[first].astype(np.float32),
                                                 features[second].astype(np.float32)), atol=1e-6)


def test_groups_are_the_planted_clusters_largest_first_center_first():
    rng = np.random.default_rng(1)
    features = unit_features(np.concatenate([clusters(rng, 5, 4, 0.2), clusters(rng, 1, 6, 0.2),
                                             unit(np.abs(rng.standard_normal((40, 64))))]))  # 40 unrelated rows
    groups = duplicates.near_duplicate_groups(features, 0.9)
    assert sorted(sorted(g.rows) for g in groups) == sorted([list(range(20, 26))] + [list(range(4 * c, 4 * c + 4))
                                                                                     for c in range(5)])
    assert [len(g.rows) for g in groups] == [6, 4, 4, 4, 4, 4]
    for group in groups:
        block = features[group.rows].astype(np.float32) @ features[group.rows].astype(np.float32).T
        assert group.scores[0] == 1.0 and group.rows[0] == group.rows[int(np.argmax(block.sum(1)))]
        np.testing.assert_allclose(group.scores[1:], block[0, 1:], atol=1e-6)
        assert group.scores[1:] == sorted(group.scores[1:], reverse=True)


def at_angle(degrees: float, wobble, rng) -> np.ndarray:
    """A unit row at `degrees` on the circle of the first two axes, nudged by `wobble` off it."""
    row = np.zeros(16)
    row[0], row[1] = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    row[2:] = wobble * rng.standard_normal(14)
    return row / np.linalg.norm(row)


def test_a_chain_of_close_pairs_does_not_join_two_photos_groups():
    """Photo A's three copies at 0 degrees, one more at 24; photo B's one at 48 and three at 72.
    Each step of 24 degrees is a pair at the threshold (cos 24 = 0.914 >= 0.9), so connected
    components would chain A and B into one group of 8 (at 72 degrees apart, cos 0.31); the mean
    similarity across them is far below the threshold, and no group holds both A's and B's copies."""
    rng = np.random.default_rng(2)
    features = unit_features(np.stack([at_angle(0, 0.02, rng) for _ in range(3)] + [at_angle(24, 0, rng), at_angle(48, 0, rng)]
                                      + [at_angle(72, 0.02, rng) for _ in range(3)]))
    pairs = brute_force_pairs(features, 0.9)
    assert {(2, 3), (3, 4), (4, 5)} <= pairs  # the chain from A's copies to B's
    groups = duplicates.near_duplicate_groups(features, 0.9)
    assert {0, 1, 2} <= set(groups[0].rows) or {0, 1, 2} <= set(groups[1].rows)
    assert not any({0, 1, 2} & set(g.rows) and {5, 6, 7} & set(g.rows) for g in groups)


def test_no_groups_without_pairs_and_for_no_images():
    features = unit_features(np.eye(5, 16))
    assert duplicates.near_duplicate_groups(features, 0.9) == []
    assert duplicates.near_duplicate_groups(np.zeros((0, 16), np.float16), 0.9) == []


@pytest.mark.parametrize("threshold", [0.5, 1.01, float("nan"), float("inf"), -0.9])
def test_thresholds_out_of_range_are_refused(threshold):
    assert "threshold must be a number from 0.7 to 1" in duplicates.threshold_problem(threshold)
    with pytest.raises(ValueError, match="threshold"):
        duplicates.near_duplicate_groups(np.ones((2, 4), np.float16), threshold)


def test_a_backbone_identity_finds_its_measured_default_and_others_take_lite0_s():
    chosen = duplicates.DEFAULT_THRESHOLDS
    assert duplicates.default_threshold("efficientnet-lite2:packaged:1280") == chosen["efficientnet-lite2"]
    assert duplicates.default_threshold("efficientnet-lite0:/my/lite0.pth:1280") == chosen["efficientnet-lite0"]
    assert duplicates.default_threshold("resnet50:/weights.pth:2048") == duplicates.default_threshold("") \
        == chosen["efficientnet-lite0"]


def test_too_many_pairs_is_refused_before_grouping(monkeypatch):
    monkeypatch.setattr(duplicates, "MAX_PAIRS", 100)
    features = unit_features(np.ones((20, 8)))  # 190 identical pairs
    with pytest.raises(duplicates.TooManyPairs, match="more than 100 pairs.*higher threshold"):
        duplicates.near_duplicate_groups(features, 0.9)


def index_with_features(count: int, rng, folder: str = "img") -> VectorIndex:
    vectors = unit(rng.standard_normal((count, 8)))
    items = [Item(f"{folder}/{i}", f"/photos/{folder}/{i}.jpg") for i in range(count)]
    return VectorIndex.build("images", vectors, items, features=np.abs(rng.standard_normal((count, 32))) * 5)


def gathered(chunks) -> tuple[list[str], np.ndarray]:
    chunks = list(chunks)
    return [item.id for items, _ in chunks for item in items], np.concatenate([f for _, f in chunks])


def test_features_are_kept_unit_float16_saved_and_loaded_lazily(tmp_path):
    index = index_with_features(50, np.random.default_rng(3))
    assert index.features.dtype == np.float16 and np.allclose(np.linalg.norm(index.features.astype(np.float32), axis=1),
                                                              1, atol=2e-3)
    index.save(tmp_path / "images")
    loaded = VectorIndex.load("images", tmp_path / "images")
    assert isinstance(loaded.features, np.memmap) and loaded.feature_dimension == 32
    ids, features = gathered(loaded.feature_chunks(size=16))
    assert ids == [f"img/{i}" for i in range(50)] and np.array_equal(features, index.features)
    ids, _ = gathered(loaded.feature_chunks(folder="img/", hidden={"img/3", "img/40"}))
    assert len(ids) == 48 and "img/3" not in ids
    assert list(loaded.feature_chunks(folder="other/")) == []
    (tmp_path / "images" / "features.npy").unlink()
    with pytest.raises(NoFeatures, match="no backbone features"):
        VectorIndex.load("images", tmp_path / "images").feature_chunks()


def test_shards_give_every_shard_s_features_or_none():
    rng = np.random.default_rng(4)
    sharded = ShardedIndex("images", [index_with_features(10, rng, "a"), index_with_features(5, rng, "b")])
    ids, features = gathered(sharded.feature_chunks())
    assert len(ids) == 15 and features.shape == (15, 32)
    assert gathered(sharded.feature_chunks(folder="b/"))[0] == [f"b/{i}" for i in range(5)]
    sharded.shards[1].features = None
    with pytest.raises(NoFeatures):
        sharded.feature_chunks()


def test_images_added_live_keep_their_features_in_the_log(tmp_path):
    rng = np.random.default_rng(5)
    base = index_with_features(20, rng)
    images = live.LiveImages(base, tmp_path, SPACE, backbone=BACKBONE)
    data = [b"photo one", b"photo two", b"photo three"]
    copy_of_first = base.features[0].astype(np.float32) * 3  # any length: kept as a unit row
    ids = images.add([(image_id(data[0]), data[0], rng.standard_normal(8), None, copy_of_first),
                      (image_id(data[1]), data[1], rng.standard_normal(8), "cat", rng.random(32)),
                      (image_id(data[2]), data[2], rng.standard_normal(8), None)])  # no features: left out
    images.delete(["img/5", ids[1]])
    for view in (images, live.LiveImages(base, tmp_path, SPACE, backbone=BACKBONE)):  # and replayed from the log
        found, features = gathered(view.feature_chunks())
        assert found == [f"img/{i}" for i in range(20) if i != 5] + [ids[0]]
        np.testing.assert_allclose(features[-1].astype(np.float32), base.features[0].astype(np.float32), atol=2e-3)
        assert view.without_features() == 1 and view.without_features("added/") == 1
        groups = duplicates.near_duplicate_groups(features, 0.99)
        assert [[found[r] for r in g.rows] for g in groups] == [["img/0", ids[0]]]
    line = json.loads((tmp_path / live.LIVE_DIR / live.LOG_NAME).read_text().splitlines()[0])
    assert line["backbone"] == BACKBONE and len(base64.b64decode(line["features"])) == 2 * 32  # float16
    other = live.LiveImages(base, tmp_path, SPACE, backbone="another:packaged:32")
    assert gathered(other.feature_chunks())[0][-1] == "img/19" and other.without_features() == 2


@pytest.mark.parametrize("features, problem", [
    (np.ones(31), "have 31 values; the artifact's backbone gives 32"),
    (np.full(32, np.nan), "NaN or infinity"),
])
def test_malformed_features_of_an_added_image_are_refused(tmp_path, features, problem):
    images = live.LiveImages(index_with_features(3, np.random.default_rng(6)), tmp_path, SPACE, backbone=BACKBONE)
    with pytest.raises(live.InvalidQuery, match=problem):
        images.add([(image_id(b"x"), b"x", np.ones(8), None, features)])
    assert not (tmp_path / live.LIVE_DIR / live.LOG_NAME).exists()


def test_an_index_without_features_takes_adds_and_ignores_their_features(tmp_path):
    rng = np.random.default_rng(7)
    base = VectorIndex.build("images", unit(rng.standard_normal((3, 8))), [Item(f"img/{i}") for i in range(3)])
    images = live.LiveImages(base, tmp_path, SPACE, backbone=BACKBONE)
    (added,) = images.add([(image_id(b"y"), b"y", np.ones(8), None, np.ones(32))])
    assert images.contains(added)
    with pytest.raises(NoFeatures):
        images.feature_chunks()
