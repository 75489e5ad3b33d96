"""The query language: parsing and the weighted mean of unit word vectors."""

import numpy as np
import pytest

from services.encoder.query import QueryError, Term, UnknownWordsError, embed, parse


def test_words_are_split_and_lower_cased():
    assert parse("  Cat   SOFA ") == [Term("cat", 1.0), Term("sofa", 1.0)]


def test_plus_minus_and_weights():
    assert parse("cat+sofa-dog") == [Term("cat", 1.0), Term("sofa", 1.0), Term("dog", -1.0)]
    assert parse("cat:2 sofa -dog:0.5") == [Term("cat", 2.0), Term("sofa", 1.0), Term("dog", -0.5)]


@pytest.mark.parametrize("text", ["", "   ", "-dog", "cat:", "cat::2", "x" * 1001, " ".join(["a"] * 65)])
def test_malformed_queries_are_rejected(text):
    with pytest.raises(QueryError):
        parse(text)


ROWS = {"cat": 0, "sofa": 1, "dog": 2}
VECTORS = np.asarray([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], dtype=np.float32)


def test_embedding_is_the_normalised_weighted_sum():
    vector = embed(parse("cat:2 sofa"), ROWS, VECTORS)
    np.testing.assert_allclose(vector, np.asarray([2, 1, 0]) / np.sqrt(5), rtol=1e-6)
    negative = embed(parse("cat+sofa-dog"), ROWS, VECTORS)
    np.testing.assert_allclose(negative, np.asarray([0.4, 0.2, 0]) / np.linalg.norm([0.4, 0.2, 0]), rtol=1e-6)


def test_unknown_words_are_all_named_once():
    with pytest.raises(UnknownWordsError) as error:
        embed(parse("cat zorp sofa zorp blib"), ROWS, VECTORS)
    assert error.value.words == ["zorp", "blib"]
    assert str(error.value) == "unknown words: zorp, blib"


def test_terms_that_cancel_out_are_an_error():
    with pytest.raises(QueryError, match="cancel"):
        embed(parse("cat-cat"), ROWS, VECTORS)


def test_punctuation_at_word_ends_is_ignored_when_the_bare_word_is_known():
    rows = {**ROWS, "?": 3}
    vectors = np.vstack([VECTORS, [[0, 0, 1]]]).astype(np.float32)
    np.testing.assert_allclose(embed(parse("cat, sofa!"), rows, vectors), embed(parse("cat sofa"), rows, vectors))
    np.testing.assert_allclose(embed(parse("?"), rows, vectors), [0, 0, 1])
    with pytest.raises(UnknownWordsError) as error:
        embed(parse("zorp, 🐱"), rows, vectors)
    assert error.value.words == ["zorp,", "🐱"]


class _RecordingExpansion:
    """A stand-in for the encoder's query expansion that records what it is asked and changes nothing."""

    def __init__(self, phrases=()):
        self.phrases, self.seen = set(phrases), []

    def __contains__(self, phrase):
        return phrase in self.phrases

    def __call__(self, word, vector):
        self.seen.append(word)
        return vector


def test_expansion_sees_the_vocabulary_word_not_its_punctuation():
    """Plumbing, with a recording stand-in for the encoder's query expansion: `cat,` is expanded as `cat`."""
    rows = {"cat": 0, "sofa": 1}
    vectors = np.eye(2, dtype=np.float32)
    expand = _RecordingExpansion()
    plain = embed(parse("cat sofa"), rows, vectors, expand)
    assert np.array_equal(embed(parse("cat, sofa!"), rows, vectors, expand), plain)
    assert expand.seen == ["cat", "sofa", "cat", "sofa"]


def test_a_known_phrase_is_expanded_as_one_term_of_its_words_weight():
    """Plumbing, with a stand-in expansion that knows the phrase `golf ball`."""
    rows = {"golf": 0, "ball": 1, "red": 2}
    vectors = np.eye(3, dtype=np.float32)
    expand = _RecordingExpansion({"golf ball"})
    together = embed(parse("red golf ball"), rows, vectors, expand)
    assert expand.seen == ["red", "golf ball"]
    # The phrase weighs as its two words: an expansion that changes nothing gives the plain query's vector.
    np.testing.assert_allclose(together, embed(parse("red golf ball"), rows, vectors), atol=1e-6)
    expand.seen.clear()
    embed(parse("golf:2 ball red"), rows, vectors, expand)  # unequal weights: two words, as written
    embed(parse("ball golf"), rows, vectors, expand)
    assert expand.seen == ["golf", "ball", "red", "ball", "golf"]
