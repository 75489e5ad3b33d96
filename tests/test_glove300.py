"""The 300-d design: batch-train with a GloVe-format text file of dimension 300, then query it."""

import numpy as np
import pytest

from batch import word_vectors
from batch.train import run
from batch.train_head import HeadConfig
from services.common import artifact
from services.encoder.core import EncoderCore
from services.index.server import load_index_set
from tests.conftest import train_options


@pytest.fixture(scope="module")
def glove_300d_file(tmp_path_factory):
    """A real vocabulary in 300 dimensions: GloVe 50d vectors through a fixed random 50 -> 300 map."""
    glove = word_vectors.load()
    keep = list(range(20_000))
    projection = np.random.default_rng(7).normal(size=(50, 300)).astype(np.float32)
    path = tmp_path_factory.mktemp("words") / "glove.test.300d.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for row in keep:
            values = " ".join(f"{v:.5f}" for v in glove.vectors[row] @ projection)
            handle.write(f"{glove.words[row]} {values}\n")
    return path


@pytest.mark.slow  # a batch-train run of its own
def test_300d_artifact_end_to_end(glove_300d_file, ray_runtime, cache_dir, cifar, tmp_path):
    version = run(train_options(cifar / "train", tmp_path / "artifacts", cache_dir, limit_per_label=40,
                                word_vectors=str(glove_300d_file), head=HeadConfig(epochs=10)))
    manifest = artifact.read_manifest(version)
    assert manifest.dimension == 300 and manifest.word_vectors.vocabulary == 20_000
    encoder = EncoderCore(version)
    assert encoder.encode_text("ship")[0].shape == (300,)
    indexes = load_index_set(version)
    assert indexes.get("words").dimension == 300 and len(indexes.get("images")) == 400
    hits = indexes.get("images").search(encoder.encode_text("ship")[0], 10)
    assert sum(hit.item.label == "ship" for hit in hits) >= 7
    # Tags over the whole 300-d vocabulary: the true label among the top 5 for unseen test photos (3 a label).
    labels = sorted(p.name for p in (cifar / "test").iterdir())
    photos = [(label, path.read_bytes()) for label in labels for path in sorted((cifar / "test" / label).iterdir())[:3]]
    vectors = encoder.encode_images([data for _, data in photos])
    tagged = [[hit.item.id for hit in indexes.get("words").search(vector, 5)] for vector in vectors]
    assert all(word in encoder.rows for tags in tagged for word in tags)
    hits = sum(label in tags for (label, _), tags in zip(photos, tagged))
    assert hits >= 15, tagged  # 22 of 30 measured; 20,000 words, so chance is near 0
