"""Queries that mix words and images, without services: the `img:` grammar, the one rule that combines
term vectors (and equals the text-only embedding), term shares, a Search's terms, nearest classes."""

import numpy as np
import pytest

from semsearch.v1 import gateway_pb2
from services.common import image_terms, mixing
from services.common.image_terms import DEFAULT_IMAGE_WEIGHT as W, ImageRef
from services.encoder.modes import Modes
from services.encoder.query import QueryError, embed, parse, term_vectors
from services.gateway.terms import BadTerms, query_of

ROWS = {"dog": 0, "fruit": 1, "beach": 2}
VECTORS = np.asarray([[1, 0, 0], [0, 1, 0], [0.6, 0, 0.8]], dtype=np.float32)


@pytest.mark.parametrize("text, words, refs", [
    ("dog + img:beach/0001.jpg - fruit", "dog - fruit", [ImageRef("beach/0001.jpg", W)]),
    ("dog+img:2024-06/a:b+c.jpg", "dog", [ImageRef("2024-06/a:b+c.jpg", W)]),  # an id runs to the next space
    ("-img:x.jpg dog", "dog", [ImageRef("x.jpg", -W)]),
    ('img:"my beach.jpg":2.5 dog -img:"a:b.jpg":0.5', "dog", [ImageRef("my beach.jpg", 2.5), ImageRef("a:b.jpg", -0.5)]),
    ("img:a.jpg:2", "", [ImageRef("a.jpg:2", W)]),  # unquoted: `:2` is part of the id, never a weight
    ("catimg:x dog", "catimg:x dog", []),  # not at a term's start: left to the words (which refuse it)
])
def test_image_terms_are_taken_out_of_the_words(text, words, refs):
    rest, found = image_terms.split(text)
    assert " ".join(rest.split()) == words and found == refs


@pytest.mark.parametrize("text", ["dog img:", 'img:"no end', 'img:"x"y', 'img:""'])
def test_malformed_image_terms_are_named(text):
    with pytest.raises(image_terms.ImageTermError, match="img:"):
        image_terms.split(text)


def test_spaces_around_plus_and_minus_and_the_encoder_refuses_image_terms():
    assert parse("dog - fruit + beach") == parse("dog-fruit+beach")
    with pytest.raises(QueryError, match="gateway"):
        parse("dog + img:beach/0001.jpg")


def test_words_alone_combine_exactly_as_the_query_language_embeds_them():
    terms = parse("dog:2 beach -fruit:0.5")
    vectors = term_vectors(terms, ROWS, VECTORS)
    mixed = mixing.combine([mixing.WeightedVector(t.term, t.weight, t.vector) for t in vectors])
    np.testing.assert_allclose(mixed.vector, embed(terms, ROWS, VECTORS), atol=1e-7)


def test_an_image_term_adds_its_unit_vector_and_the_shares_add_up_to_the_score():
    photo = np.asarray([0, 0.6, 0.8], np.float32)
    terms = [mixing.WeightedVector("dog", 1.0, VECTORS[0]), mixing.WeightedVector("img:x", 2.0, photo),
             mixing.WeightedVector("fruit", -1.0, VECTORS[1])]
    mixed = mixing.combine(terms)
    expected = VECTORS[0] + 2 * photo - VECTORS[1]
    np.testing.assert_allclose(mixed.vector, expected / np.linalg.norm(expected), rtol=1e-6)
    assert mixed.norm == pytest.approx(np.linalg.norm(expected))
    results = np.random.default_rng(0).normal(size=(7, 3))
    results /= np.linalg.norm(results, axis=1, keepdims=True)
    shares = mixing.shares(terms, mixed.norm, results)
    np.testing.assert_allclose(shares.sum(axis=1), results @ mixed.vector, atol=1e-6)
    assert shares[0, 2] == pytest.approx(-(results[0] @ VECTORS[1]) / mixed.norm)


@pytest.mark.parametrize("terms, problem", [
    ([("fruit", -1.0, [0, 1, 0])], "positive"),
    ([("dog", 1.0, [1, 0, 0]), ("img:x", -1.0, [1, 0, 0])], "cancel"),
])
def test_terms_without_a_query_are_refused(terms, problem):
    with pytest.raises(mixing.MixError, match=problem):
        mixing.combine([mixing.WeightedVector(n, w, np.asarray(v, np.float32)) for n, w, v in terms])


def test_a_searchs_terms_in_order_with_their_weights():
    request = gateway_pb2.SearchRequest(text='dog img:"a b.jpg":2 - fruit', terms=[
        gateway_pb2.QueryTerm(image=b"jpeg bytes", name="photo.jpg"),
        gateway_pb2.QueryTerm(image_id="beach/0001.jpg", weight=-1)])
    query = query_of(request)
    assert (query.text.text.split(), query.text.weight) == (["dog", "-", "fruit"], 1.0)
    assert [(i.name, i.weight, i.id, i.data) for i in query.images] == [
        ('img:"a b.jpg"', 2.0, "a b.jpg", None), ("photo.jpg", W, None, b"jpeg bytes"),
        ("img:beach/0001.jpg", -1.0, "beach/0001.jpg", None)]
    weighted = query_of(gateway_pb2.SearchRequest(terms=[gateway_pb2.QueryTerm(text="dog -img:x", weight=2)]))
    assert (weighted.text.weight, weighted.images[0].weight) == (2.0, -2 * W)  # a text's weight multiplies its terms
    assert query.plain_text is None
    assert query_of(gateway_pb2.SearchRequest(text="dog - fruit")).plain_text == "dog - fruit"  # today's path
    assert query_of(gateway_pb2.SearchRequest(image=b"x")).plain_image == b"x"


@pytest.mark.parametrize("request_, problem", [
    (gateway_pb2.SearchRequest(), "needs a query"),
    (gateway_pb2.SearchRequest(text="dog", terms=[gateway_pb2.QueryTerm(text="cat")]), "one text"),
    (gateway_pb2.SearchRequest(text=" ".join(f"img:{n}.jpg" for n in range(9))), "9 image terms in one query; the limit is 8"),
    (gateway_pb2.SearchRequest(text="dog", terms=[gateway_pb2.QueryTerm(image_id=f"{n}") for n in range(9)]), "limit is 8"),
    (gateway_pb2.SearchRequest(terms=[gateway_pb2.QueryTerm(weight=1)]), "term 1 is empty"),
    (gateway_pb2.SearchRequest(terms=[gateway_pb2.QueryTerm(image_id="x", weight=float("nan"))]), "finite"),
    (gateway_pb2.SearchRequest(text="dog img:"), "img:"),
])
def test_malformed_searches_say_what_is_wrong(request_, problem):
    with pytest.raises(BadTerms, match=problem):
        query_of(request_)


def test_nearest_classes_are_the_class_vectors_of_largest_cosine():
    table = np.asarray([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], np.float32)
    modes = Modes(None, np.zeros((4, 3), np.float32), np.zeros(3, np.float32), table, np.eye(3, dtype=np.float32),
                  class_names=("a", "b", "ab"))
    found = modes.nearest_classes(np.asarray([[0.1, 1, 0], [2, 0, 0]], np.float32), 2)
    assert [[name for name, _ in row] for row in found] == [["b", "ab"], ["a", "ab"]]
    assert found[1][0][1] == pytest.approx(1.0) and found[1][1][1] == pytest.approx(0.6)
    unnamed = Modes(None, np.zeros((4, 3), np.float32), np.zeros(3, np.float32), table, np.eye(3, dtype=np.float32))
    assert unnamed.nearest_classes(np.ones((2, 3), np.float32), 2) == [[], []]  # an artifact made before names


def test_mixed_query_figures_leave_the_query_photo_out_and_choose_the_weight_on_validation():
    from batch.evaluate_mixed import IMAGE_WEIGHTS, average_precision, category_aps, mixed_queries
    from batch.open_vocab import OpenSet

    assert average_precision(np.asarray([0.9, 0.8, 0.7, 0.1]), np.asarray([True, False, True, False])) == \
        pytest.approx((1 / 1 + 2 / 3) / 2)
    # two categories, three photos each; each photo lies between its category's word and a shared direction
    rows, words = {"dog": 0, "fruit": 1}, np.eye(3, dtype=np.float32)[:2]
    photos = np.asarray([[1, 0, 1], [1, 0, 0.9], [0.2, 0, 1], [0, 1, 1], [0, 1, 0.9], [0, 0.2, 1]], np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    truth = np.asarray(["dog"] * 3 + ["fruit"] * 3)
    open_set = OpenSet(photos, truth, [f"{t}/{n}" for n, t in enumerate(truth)], [""] * 6)
    aps = category_aps(photos, open_set, ["dog", "fruit"], rows, words, None, 1.0)
    assert set(aps) == {"dog", "fruit"} and all(0 < ap["photo"] <= 1 and ap["word"] == 1.0 for ap in aps.values())
    block = mixed_queries(photos, open_set, rows, words, None, "conse")
    assert block["chosen_weight"] in IMAGE_WEIGHTS
    assert set(block["validation_by_weight"]) == {f"{w:g}" for w in IMAGE_WEIGHTS}
    assert set(block["halves"]) == {"validation", "test"}
