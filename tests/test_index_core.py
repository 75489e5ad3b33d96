"""VectorIndex against numpy brute force on real GloVe vectors; serialization; query validation."""

import shutil

import numpy as np
import pytest

from batch import word_vectors
from services.common.items import Item
from services.index.core import IndexSet, InvalidQuery, UnknownId, UnknownIndex, VectorIndex


@pytest.fixture(scope="module")
def glove():
    return word_vectors.load()


def exact_top(vectors, queries, k):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_brute_force_matches_numpy_exactly(glove):
    vectors = glove.vectors[:5000]
    index = VectorIndex.build("small", vectors, [Item(w) for w in glove.words[:5000]])
    assert index.config.method == "brute_force"
    queries = glove.vectors[5000:5050]
    expected = exact_top(vectors, queries, 10)
    for query, rows in zip(queries, expected):
        hits = index.search(query, 10)
        np.testing.assert_allclose([h.score for h in hits], (vectors[rows] @ query), atol=1e-5)
        assert {h.item.id for h in hits} == {glove.words[r] for r in rows}


def test_tree_ah_recall_on_real_words(glove):
    n = 60_000
    index = VectorIndex.build("words", glove.vectors[:n], [Item(w) for w in glove.words[:n]])
    assert index.config.method == "tree_ah"
    rng = np.random.default_rng(1)
    rows = rng.choice(n, 200, replace=False)
    expected = exact_top(glove.vectors[:n], glove.vectors[rows], 10)
    recall = np.mean([len({h.item.id for h in index.search(glove.vectors[r], 10)} & {glove.words[e] for e in exp}) / 10
                      for r, exp in zip(rows, expected)])
    assert recall >= 0.9, recall


@pytest.mark.parametrize("n", [3000, 25_000])
def test_save_and_load_elsewhere_gives_the_same_answers(glove, tmp_path, n):
    items = [Item(w, path=f"/images/{w}.jpg", label="x" if i % 2 else None) for i, w in enumerate(glove.words[:n])]
    index = VectorIndex.build("images", glove.vectors[:n], items)
    index.save(tmp_path / "first")
    shutil.move(tmp_path / "first", tmp_path / "moved")  # published artifacts are renamed into place
    loaded = IndexSet.load(tmp_path, "v1").get("moved")
    assert "first" not in (tmp_path / "moved" / "scann" / "scann_assets.pbtxt").read_text()
    for query in glove.vectors[n:n + 20]:
        assert index.search(query, 25) == loaded.search(query, 25)
    assert loaded.items[1] == Item(glove.words[1], f"/images/{glove.words[1]}.jpg", "x")


@pytest.mark.parametrize("n", [3000, 25_000])
def test_a_batch_of_searches_answers_as_each_search_does(glove, n):
    """SearchMany (the explanations' word searches) must give exactly what Search (Tag) gives."""
    index = VectorIndex.build("words", glove.vectors[:n], [Item(w) for w in glove.words[:n]])
    queries = glove.vectors[n:n + 40] + 0.3 * glove.vectors[n + 40:n + 80]
    batched, each = index.search_many(list(queries), 7), [index.search(query, 7) for query in queries]
    assert [[h.item.id for h in hits] for hits in batched] == [[h.item.id for h in hits] for hits in each]
    np.testing.assert_allclose([[h.score for h in hits] for hits in batched], [[h.score for h in hits] for hits in each],
                               atol=1e-6)  # a batched dot product may differ in the last bit
    assert index.search_many([], 7) == []
    with pytest.raises(InvalidQuery):
        index.search_many([np.zeros(glove.dimension)], 7)


@pytest.fixture(scope="module")
def small(glove):
    return VectorIndex.build("small", glove.vectors[:2000], [Item(w) for w in glove.words[:2000]])


def test_min_score_exclude_and_k_larger_than_the_index(small, glove):
    query = small.vector_of("king")
    hits = small.search(query, 10, exclude={"king"})
    assert "king" not in [h.item.id for h in hits] and len(hits) == 10
    assert small.search(query, 1)[0].item.id == "king"
    filtered = small.search(query, 1000, min_score=0.6)
    assert filtered and all(h.score >= 0.6 for h in filtered)
    assert len(small.search(query, 1000)) == 1000
    tiny = VectorIndex.build("tiny", glove.vectors[:3], [Item(w) for w in glove.words[:3]])
    assert len(tiny.search(query, 10)) == 3


@pytest.mark.parametrize("query, k, min_score, message", [
    (np.ones(49), 5, None, "dimension 49"),
    (np.full(50, np.nan), 5, None, "NaN"),
    (np.full(50, np.inf), 5, None, "NaN or infinity"),
    (np.zeros(50), 5, None, "all zeros"),
    (np.ones(50), 0, None, "k must be"),
    (np.ones(50), 1001, None, "k must be"),
    (np.ones(50), 5, 1.5, "min_score"),
])
def test_bad_queries_are_rejected_with_a_reason(small, query, k, min_score, message):
    with pytest.raises(InvalidQuery, match=message):
        small.search(query, k, min_score)


def test_unknown_ids_and_indexes(small):
    with pytest.raises(UnknownId, match="zzzzqq"):
        small.vector_of("zzzzqq")
    with pytest.raises(UnknownIndex, match="there are: small"):
        IndexSet({"small": small}).get("nope")


def test_a_torn_log_line_is_skipped_and_later_writes_survive(tmp_path):
    """A crash half-way through an append leaves a partial line: it is never applied, nothing after it is lost."""
    from services.common.ids import image_id
    from services.index import live

    log = live.LiveLog(tmp_path)
    first = live.Entry("add", image_id(b"one"), "cat", log.store_image(b"one"), (1.0, 0.0), "glove:2")
    log.append([first])
    with open(log.path, "ab") as handle:
        handle.write(b'{"op": "add", "id": "added/0123')  # the torn write
    assert log.read()[0] == [first]
    second = live.Entry("delete", first.id)
    log.append([second])
    assert log.read()[0] == [first, second]
    assert live.membership(tmp_path) == ({}, {first.id})
    assert sorted(p.name for p in (tmp_path / live.LIVE_DIR).iterdir()) == [live.IMAGES_DIR, live.LOG_NAME, live.LOCK_NAME]
