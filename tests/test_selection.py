"""Filters (label, folder) and pages inside the index: real GloVe vectors, real ScaNN (tree + AH above
20,000 rows, brute force below), checked against numpy's exact answers over the matching rows."""

import numpy as np
import pytest

from batch import word_vectors
from services.common.items import Item
from services.index.core import VectorIndex
from services.index.selection import Cursor, Selection, folder_prefix, selection_problem

N = 40_000
LABELS = ("cat", "dog", "ship", "car", "tree", "bird", "boat", "house", "road", "sky")
NEEDLE = 12_345  # the one row labelled `needle`


@pytest.fixture(scope="module")
def glove():
    return word_vectors.load()


def _item(row: int, word: str) -> Item:
    """Every tenth row is labelled `cat`; ids sit in one folder per thousand rows (`f12/word`)."""
    return Item(f"f{row // 1000}/{word}", label="needle" if row == NEEDLE else LABELS[row % 10])


@pytest.fixture(scope="module")
def big(glove):
    index = VectorIndex.build("images", glove.vectors[:N], [_item(r, w) for r, w in enumerate(glove.words[:N])])
    assert index.config.method == "tree_ah"
    return index


def _exact(glove, query, rows, k):
    scores = glove.vectors[rows] @ query
    return [f"f{rows[i] // 1000}/{glove.words[rows[i]]}" for i in np.argsort(-scores, kind="stable")[:k]]


def test_a_filter_that_keeps_a_tenth_finds_what_exact_search_over_it_finds(big, glove):
    rows = np.arange(N)[np.arange(N) % 10 == 0]  # the `cat` rows
    queries = glove.vectors[N:N + 100]
    recall = np.mean([len({h.item.id for h in big.search(q, 10, selection=Selection(frozenset({"cat"})))}
                          & set(_exact(glove, q, rows, 10))) / 10 for q in queries])
    assert recall >= 0.95, recall
    hits = big.search(queries[0], 10, selection=Selection(frozenset({"cat"})))
    assert len(hits) == 10 and all(h.item.label == "cat" for h in hits)


def test_a_filter_that_keeps_few_rows_is_exact_and_one_row_comes_first(big, glove):
    """Folder f7/ with label dog keeps 100 rows of 40,000, label `needle` one: k come back whenever k match."""
    selection = Selection(frozenset({"dog"}), folder_prefix("f7"))
    rows = np.asarray([r for r in range(7000, 8000) if r % 10 == 1])
    for query in glove.vectors[N:N + 20]:
        assert [h.item.id for h in big.search(query, 10, selection=selection)] == _exact(glove, query, rows, 10)
    for query in (glove.vectors[NEEDLE], glove.vectors[N + 1]):  # a matching query, and any other
        hits = big.search(query, 10, selection=Selection(frozenset({"needle"})))
        assert [h.item.id for h in hits] == [f"f12/{glove.words[NEEDLE]}"]
    assert big.search(glove.vectors[NEEDLE], 1, selection=Selection(frozenset({"needle"})))[0].score > 0.999


def test_unknown_label_or_folder_is_an_empty_answer(big, glove):
    assert big.search(glove.vectors[0], 10, selection=Selection(frozenset({"unicorn"}))) == []
    assert big.search(glove.vectors[0], 10, selection=Selection(folder=folder_prefix("nowhere/"))) == []
    # `f1` is a folder, not a prefix of `f10/...`
    assert {h.item.id.split("/")[0] for h in big.search(glove.vectors[0], 50, selection=Selection(folder="f1/"))} == {"f1"}


@pytest.mark.parametrize("selection", [Selection(), Selection(frozenset({"cat", "dog"})), Selection(folder="f3/")])
def test_pages_follow_each_other_without_overlap(big, glove, selection):
    query = glove.vectors[N + 7]
    seen, after = [], None
    for page in range(4):
        current = Selection(selection.labels, selection.folder, cursor=after)
        hits = big.search(query, 10, selection=current)
        assert len(hits) == 10
        seen += [h.item.id for h in hits]
        after = Cursor(hits[-1].score, hits[-1].item.id, skipped=len(seen))
    assert len(set(seen)) == 40
    # The four pages together are (nearly, ScaNN being approximate) the top 40 of one search.
    whole = [h.item.id for h in big.search(query, 40, selection=selection)]
    assert len(set(whole) & set(seen)) >= 38


def test_pages_on_a_brute_force_index_equal_slices_of_one_search(glove):
    index = VectorIndex.build("small", glove.vectors[:3000], [_item(r, w) for r, w in enumerate(glove.words[:3000])])
    query = glove.vectors[3001]
    whole = [h.item.id for h in index.search(query, 30)]
    first = index.search(query, 10)
    second = index.search(query, 10, selection=Selection(cursor=Cursor(first[-1].score, first[-1].item.id, 10)))
    assert [h.item.id for h in first + second] == whole[:20]


def test_bad_filters_are_named():
    assert "labels" in selection_problem(["x"] * 65, "", None)
    assert "characters" in selection_problem(["x" * 101], "", None)
    assert "folder" in selection_problem([], "a" * 1001, None)
    assert "cursor" in selection_problem([], "", Cursor(float("nan"), "a"))
    assert selection_problem(["dog"], "2024/", Cursor(0.5, "a", 10)) is None
