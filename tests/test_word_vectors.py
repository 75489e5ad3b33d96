"""Word vectors: the packaged GloVe 6B 50d and user files (GloVe text, .npy + word list)."""

import numpy as np
import pytest

from services.encoder import word_vectors


def test_packaged_glove_is_400k_unit_vectors_of_dimension_50():
    words = word_vectors.load()
    assert len(words.words) == 400_000 and words.dimension == 50
    assert words.words[:3] == ["the", ",", "."]
    norms = np.linalg.norm(words.vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    rows = words.index()
    assert words.vectors[rows["king"]] @ words.vectors[rows["queen"]] > words.vectors[rows["king"]] @ words.vectors[rows["banana"]]


def test_glove_text_file_skips_malformed_lines(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("cat 3 4 0\nbad line here\ndog 0 0 2\nsofa 1 x 1\nsky 1 1 1\n")
    words = word_vectors.load(str(path))
    assert words.words == ["cat", "dog", "sky"]
    assert words.dimension == 3
    np.testing.assert_allclose(words.vectors[0], [0.6, 0.8, 0.0], rtol=1e-6)


def test_npy_with_word_list(tmp_path):
    np.save(tmp_path / "vectors.npy", np.asarray([[2.0, 0.0], [0.0, 5.0]]))
    (tmp_path / "vectors.words.txt").write_text("left\nup\n")
    words = word_vectors.load(str(tmp_path / "vectors.npy"))
    assert words.words == ["left", "up"]
    np.testing.assert_allclose(words.vectors, np.eye(2))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        word_vectors.load(str(tmp_path / "nothing.txt"))
    np.save(tmp_path / "alone.npy", np.zeros((1, 2)))
    with pytest.raises(FileNotFoundError, match="word list"):
        word_vectors.load(str(tmp_path / "alone.npy"))
