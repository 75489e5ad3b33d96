"""Open vocabulary: WordNet hypernyms, enriched ImageNet class vectors, the category split and the
retrieval figures (against hand-computed values), and the gated mode on real photos."""

from __future__ import annotations

import numpy as np
import pytest

from batch import open_vocab, word_vectors, wordnet
from batch.class_table import PLAIN, Enrichment, class_table, expansions, imagenet_classes
from services.encoder.modes import QueryExpansion
from services.encoder.query import Term, embed


@pytest.fixture(scope="module")
def names() -> wordnet.WordNet:
    return wordnet.load()


@pytest.fixture(scope="module")
def words() -> word_vectors.WordVectors:
    return word_vectors.load()


def test_wordnet_hypernyms_of_imagenet_classes(names):
    dog = names.levels("n02084071", 4)
    assert dog[0][0] == "dog" and "canine" in dog[1]
    assert "animal" in {word for level in dog[:3] for word in level}
    goldfinch = [word for level in names.levels("n01531178", 5) for word in level]
    assert goldfinch.index("goldfinch") < goldfinch.index("finch") < goldfinch.index("bird")
    with pytest.raises(KeyError, match="n99999999"):
        names.levels("n99999999", 2)


def test_missing_wordnet_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make wordnet"):
        wordnet.load(tmp_path / "data.noun")


def test_enriched_class_vectors_reach_broader_words_and_keep_their_own(names, words):
    rows = words.index()
    plain = class_table(rows, words.vectors, names, PLAIN)
    enriched = class_table(rows, words.vectors, names, Enrichment())
    classes, _ = imagenet_classes()
    near = lambda table, name, word: float(table[classes.index(name)] @ words.vectors[rows[word]])  # noqa: E731
    for name, broad in (("goldfinch", "bird"), ("Beagle", "dog"), ("grand piano", "instrument")):
        assert near(enriched, name, broad) > near(plain, name, broad) + 0.05
    # Among all 1000 classes, the class's own name still finds it first or nearly so.
    for name, word in (("goldfinch", "goldfinch"), ("harmonica", "harmonica"), ("couch", "sofa")):
        order = np.argsort(-(enriched @ words.vectors[rows[word]]))
        assert classes.index(name) in order[:3]
    assert np.allclose(np.linalg.norm(enriched, axis=1), 1.0, atol=1e-5)


def test_category_split_is_fixed_and_disjoint():
    labels = ["dog", "ant", "zebra", "cup_or_mug", "bee"]
    validation, test = open_vocab.split_labels(labels)
    assert validation == ["ant", "cup_or_mug", "zebra"] and test == ["bee", "dog"]
    assert open_vocab.split_labels(reversed(labels)) == (validation, test)


def test_label_queries_read_as_a_user_types_them(words):
    rows = words.index()
    expected = embed([Term("cup", 1.0), Term("mug", 1.0)], rows, words.vectors)
    np.testing.assert_allclose(open_vocab.label_query("cup_or_mug", rows, words.vectors), expected, atol=1e-6)
    np.testing.assert_allclose(open_vocab.label_query("ping-pong_ball", rows, words.vectors),
                               embed([Term(w, 1.0) for w in ("ping", "pong", "ball")], rows, words.vectors), atol=1e-6)
    assert open_vocab.label_query("zzqx_vvqz", rows, words.vectors) is None


def test_retrieval_figures_match_hand_computed_ones():
    """Two categories in a 2-d word space; the ranks of the relevant photos give P@5 and AP by hand."""
    rows = {"a": 0, "b": 1}
    space = np.eye(2, dtype=np.float32)
    angles = np.radians([0, 10, 80, 20, 85, 30, 89])  # photo i at angle from word `a` towards `b`
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    truth = np.asarray(["a", "a", "a", "b", "b", "b", "b"])
    result = open_vocab.retrieval(vectors, truth, ["a", "b", "c"], rows, space)
    # query a ranks photos 0,1,3,5,2,4,6: relevant at ranks 1,2,5 -> AP (1 + 1 + 3/5)/3; P@5 3/5
    # query b ranks 6,4,2,5,3,1,0: relevant at ranks 1,2,4,5 -> AP (1 + 1 + 3/4 + 4/5)/4; P@5 4/5
    assert result["per_query"]["a"] == pytest.approx({"p5": 0.6, "ap": (2 + 0.6) / 3})
    assert result["per_query"]["b"] == pytest.approx({"p5": 0.8, "ap": (2 + 0.75 + 0.8) / 4})
    assert result["not_asked"] == ["c"] and result["queries"] == 2
    assert result["map"] == pytest.approx(((2 + 0.6) / 3 + (2 + 0.75 + 0.8) / 4) / 2)


def test_broad_words_come_from_shared_hypernyms(names, words, real_photos):
    found = [r for r in open_vocab.records(real_photos) if r.label in
             {"dog", "domestic_cat", "lion", "zebra", "bus", "car", "motorcycle", "snowplow", "lemon"}]
    synsets = open_vocab.category_synsets(found)
    assert synsets["dog"] == "n02084071" and len(synsets) == 9
    broad = open_vocab.broad_words(synsets, sorted(synsets), names, words.index(), max_share=0.5)
    assert set(broad["carnivore"]) == {"dog", "domestic_cat", "lion"}
    assert {"car", "motorcycle", "snowplow"} == set(broad["vehicle"]) and "bus" in broad["conveyance"]
    assert all(3 <= len(labels) <= 4 for labels in broad.values())


def test_broad_precision_counts_photos_of_the_categories_below():
    rows = {"animal": 0, "tool": 1}
    space = np.eye(2, dtype=np.float32)
    vectors = np.asarray([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9]], np.float32)
    truth = np.asarray(["dog", "hammer", "cat", "hammer", "saw"])
    result = open_vocab.broad_precision(vectors, truth, {"animal": ["cat", "dog"], "tool": ["hammer", "saw"]},
                                        rows, space, k=2)
    assert result["per_query"] == {"animal": 0.5, "tool": 1.0} and result["p10"] == 0.75


def test_query_expansion_moves_a_word_towards_the_classes_below_it(names, words):
    rows = words.index()
    table = class_table(rows, words.vectors, names, Enrichment())
    expansion = QueryExpansion(*(lambda found, vectors: (tuple(found), vectors))(*expansions(names, rows, table)))
    classes, _ = imagenet_classes()
    dog, animal, ocean = (words.vectors[rows[w]] for w in ("dog", "animal", "ocean"))
    beagle, tabby, teapot = (table[classes.index(name)] for name in ("Beagle", "tabby cat", "teapot"))
    expanded_dog = expansion.apply("dog", dog, 2.0)
    assert expanded_dog @ beagle > dog @ beagle + 0.05 and abs(float(np.linalg.norm(expanded_dog)) - 1) < 1e-5
    expanded_animal = expansion.apply("animal", animal, 2.0)
    assert expanded_animal @ tabby > animal @ tabby and expanded_animal @ beagle > expanded_animal @ teapot
    # A word that names no ImageNet class nor any of their hypernyms, or a zero weight, changes nothing.
    assert "ocean" not in expansion.rows and np.array_equal(expansion.apply("ocean", ocean, 2.0), ocean)
    assert np.array_equal(expansion.apply("dog", dog, 0.0), dog)


def test_a_phrase_that_names_classes_moves_towards_them_as_one(names, words):
    """`wind instrument`, `hunting dog`: WordNet lemmas of several words expand as phrases, towards the
    classes below them, further than the words one by one reach."""
    rows = words.index()
    table = class_table(rows, words.vectors, names, Enrichment())
    expansion = QueryExpansion(*(lambda found, vectors: (tuple(found), vectors))(*expansions(names, rows, table)))
    classes, wnids = imagenet_classes()
    for phrase, synset in (("wind instrument", "n04586932"), ("hunting dog", "n02087122")):
        assert phrase in expansion.at(1.0) and phrase not in expansion.at(0.0)
        below = [k for k, wnid in enumerate(wnids) if synset.lstrip("n") in names.ancestors(wnid)]
        assert len(below) >= 5
        terms = [Term(word, 1.0) for word in phrase.split()]
        as_phrase = embed(terms, rows, words.vectors, expansion.at(1.0))
        word_by_word = embed(terms, rows, words.vectors)
        assert float(np.mean(table[below] @ as_phrase)) > float(np.mean(table[below] @ word_by_word)) + 0.05
