"""batch-train, unchanged, on a real two-node Ray cluster: work lands on both nodes, same artifact."""

import json
import subprocess
import sys

import numpy as np
import pytest

import batch.train
from batch.train_head import HeadConfig
from services.common import artifact
from services.common.items import read_items
from tests.conftest import REPO, TEST_BACKBONE, train_options

pytestmark = pytest.mark.slow  # a two-node Ray cluster and two batch-train runs: minutes

FLAGS = ["--limit-per-label", "20", "--epochs", "3", "--no-quality", "--backbone", TEST_BACKBONE]


def run_job(command, tmp_path, name):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return artifact.resolve(tmp_path / name)


def test_two_node_cluster_matches_a_single_node_run(cifar, ray_runtime, cache_dir, tmp_path):
    """The cluster run extracts every feature itself (a cache of its own); the single-node run is the
    same job in the test session's local Ray runtime, with the features that runtime extracted."""
    data = str(cifar / "train")
    clustered = run_job([sys.executable, "-m", "tests.ray_cluster_job", data, str(tmp_path / "cluster"),
                         str(tmp_path / "cache-cluster"), *FLAGS], tmp_path, "cluster")
    single = batch.train.run(train_options(cifar / "train", tmp_path / "single", cache_dir, limit_per_label=20,
                                           head=HeadConfig(epochs=3), quality=False))

    by_node = json.loads((clustered / artifact.REPORT).read_text())["images"]["extracted_by_node"]
    assert len(by_node) == 2 and sum(by_node.values()) == 200 and min(by_node.values()) > 0, by_node

    a, b = artifact.read_manifest(clustered), artifact.read_manifest(single)
    assert a.indexes == b.indexes and a.labels == b.labels and a.dimension == b.dimension
    for name in ("backbone.onnx", "indexes/words/vectors.npy", "indexes/words/items.jsonl"):
        assert a.files[name] == b.files[name], name
    images = artifact.INDEXES + "/images/"
    assert read_items(clustered / images / "items.jsonl") == read_items(single / images / "items.jsonl")
    np.testing.assert_allclose(np.load(clustered / images / "vectors.npy"), np.load(single / images / "vectors.npy"),
                               atol=1e-3)
