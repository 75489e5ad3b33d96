"""Mixed queries (words and photos) and explanations, on the real services of the session artifact."""

import json
import time

import grpc
import numpy as np
import pytest

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import metrics
from services.common.wait_ready import wait_serving
from services.gateway import cli
from services.gateway import server as gateway_server
from tests.helpers import status_of

LIMIT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def stubs(services):
    channels = [grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 2 * LIMIT)])
                for a in (services.gateway, services.encoder, services.index)]
    yield (gateway_pb2_grpc.GatewayStub(channels[0]), encoder_pb2_grpc.EncoderStub(channels[1]),
           index_pb2_grpc.IndexStub(channels[2]))
    for channel in channels:
        channel.close()


def _photo_id(index, label: str) -> tuple[str, str]:
    """(id, path) of the first indexed photo labelled `label`."""
    vector = index.GetVectors(index_pb2.GetVectorsRequest(index="images", ids=[f"{label}/0000.jpg"])).items[0]
    return vector.id, vector.path


def test_a_photo_and_a_word_make_one_unit_vector_of_their_weighted_sum(stubs):
    gateway, encoder, index = stubs
    photo, _ = _photo_id(index, "ship")
    word = encoder.EncodeText(encoder_pb2.EncodeTextRequest(text="water", with_terms=True)).term_vectors[0]
    stored = index.GetVectors(index_pb2.GetVectorsRequest(index="images", ids=[photo])).vectors[0]
    query = 2 * np.asarray(stored.values) + np.asarray(word.values)
    query /= np.linalg.norm(query)
    by_hand = index.Search(index_pb2.IndexSearchRequest(index="images", k=8, vector=index_pb2.FloatVector(values=query)))
    mixed = gateway.Search(gateway_pb2.SearchRequest(text=f'water + img:"{photo}":2', k=8))
    assert [r.id for r in mixed.results] == [n.id for n in by_hand.neighbors]
    np.testing.assert_allclose([r.score for r in mixed.results], [n.score for n in by_hand.neighbors], atol=1e-5)
    as_terms = gateway.Search(gateway_pb2.SearchRequest(text="water", k=8, terms=[
        gateway_pb2.QueryTerm(image_id=photo, weight=2)]))
    assert [r.id for r in as_terms.results] == [r.id for r in mixed.results]


def test_text_alone_ranks_the_same_with_and_without_explain(stubs):
    gateway, _, _ = stubs
    plain = gateway.Search(gateway_pb2.SearchRequest(text="dog:2 grass -cat", k=10))
    explained = gateway.Search(gateway_pb2.SearchRequest(text="dog:2 grass -cat", k=10, explain=True))
    assert [r.id for r in explained.results] == [r.id for r in plain.results]
    np.testing.assert_allclose([r.score for r in explained.results], [r.score for r in plain.results], atol=1e-6)
    assert not any(r.HasField("explanation") for r in plain.results)  # nothing computed unless asked
    assert [(s.term, s.weight) for s in explained.results[0].explanation.shares] == [
        ("dog", 2.0), ("grass", 1.0), ("cat", -1.0)]
    nothing = gateway.Search(gateway_pb2.SearchRequest(text="dog", k=5, min_score=0.999, explain=True))
    assert not nothing.results


@pytest.mark.parametrize("query", ["dog:2 grass -cat", "img:ship/0000.jpg + water - sky"])
def test_each_results_term_shares_add_up_to_its_score(stubs, query):
    gateway, _, _ = stubs
    answer = gateway.Search(gateway_pb2.SearchRequest(text=query, k=20, explain=True))
    assert len(answer.results) == 20
    for result in answer.results:
        shares = [s.share for s in result.explanation.shares]
        assert len(shares) == 3
        assert abs(sum(shares) - result.score) < 1e-5, (result.id, shares, result.score)


def test_the_listed_words_are_the_photos_own_top_tags(stubs, cifar):
    gateway, encoder, index = stubs
    answer = gateway.Search(gateway_pb2.SearchRequest(text="horse", k=5, explain=True))
    mode = encoder.Info(encoder_pb2.EncoderInfoRequest()).default_mode
    for result in answer.results:
        with open(result.path, "rb") as photo:
            tags = gateway.Tag(gateway_pb2.TagRequest(image=photo.read(), k=5)).words
        assert [w.word for w in result.explanation.words] == [t.word for t in tags]
        np.testing.assert_allclose([w.score for w in result.explanation.words], [t.score for t in tags], atol=1e-4)
        classes = result.explanation.classes
        if mode == "devise":
            assert not classes
        else:  # the class vectors nearest the photo's vector, best first
            assert len(classes) == 3 and classes[0].score >= classes[1].score >= classes[2].score
            stored = index.GetVectors(index_pb2.GetVectorsRequest(index="images", ids=[result.id])).vectors[0]
            nearest = encoder.NearestClasses(encoder_pb2.NearestClassesRequest(
                vectors=[encoder_pb2.Vector(values=stored.values)], k=3)).lists[0].classes
            assert [c.name for c in classes] == [c.name for c in nearest]


def test_similar_images_explained_the_query_photo_is_the_whole_score(stubs):
    gateway, _, index = stubs
    photo, _ = _photo_id(index, "cat")
    answer = gateway.SimilarImages(gateway_pb2.SimilarImagesRequest(id=photo, k=5, explain=True))
    for result in answer.results:
        assert [(s.term, s.weight) for s in result.explanation.shares] == [(f"img:{photo}", 1.0)]
        assert result.explanation.shares[0].share == pytest.approx(result.score, abs=1e-6)
        assert len(result.explanation.words) == 5


def _downstream_calls(telemetry: metrics.Telemetry) -> dict[tuple[str, str], float]:
    counts = {}
    for family in telemetry.registry.collect():
        for sample in family.samples:
            if sample.name == "semsearch_downstream_seconds_count":
                counts[sample.labels["hop"], sample.labels["grpc_method"]] = sample.value
    return counts


def _calls_after(telemetry, before: dict, expected: int) -> dict:
    """The calls made since `before`, once `expected` of them are recorded (a call is recorded just
    after it returns, by its done callback)."""
    deadline = time.monotonic() + 30
    while True:
        now = _downstream_calls(telemetry)
        made = {key: value - before.get(key, 0) for key, value in now.items() if value - before.get(key, 0)}
        if sum(made.values()) >= expected or time.monotonic() > deadline:
            return made
        time.sleep(0.01)


def test_explain_costs_one_extra_call_per_downstream_and_none_when_off(services):
    telemetry = metrics.Telemetry("gateway", metrics_port=0)
    with gateway_server.run_server(0, services.encoder, services.index, telemetry=telemetry) as (_, port):
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            gateway = gateway_pb2_grpc.GatewayStub(channel)
            before = _downstream_calls(telemetry)
            gateway.Search(gateway_pb2.SearchRequest(text="dog", k=30))
            off = _calls_after(telemetry, before, 2)
            before = _downstream_calls(telemetry)
            gateway.Search(gateway_pb2.SearchRequest(text="dog + img:ship/0000.jpg", k=30, explain=True))
            on = _calls_after(telemetry, before, 5)
    assert off == {("encoder", "EncodeText"): 1, ("index", "Search"): 1}
    assert on == {("encoder", "EncodeText"): 1, ("index", "GetVectors"): 1, ("index", "Search"): 1,
                  ("index", "SearchMany"): 1, ("encoder", "NearestClasses"): 1}  # for 30 results


def test_bad_mixed_queries_get_clear_statuses(stubs, cifar):
    gateway, _, _ = stubs
    search = gateway.Search
    code, details = status_of(search, gateway_pb2.SearchRequest(text="dog + img:beach/0001.jpg - fruit", k=5))
    assert code == grpc.StatusCode.NOT_FOUND and "beach/0001.jpg" in details
    code, details = status_of(search, gateway_pb2.SearchRequest(
        text="dog", k=5, terms=[gateway_pb2.QueryTerm(image_id="cat/0000.jpg")] * 9))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit is 8" in details
    code, details = status_of(search, gateway_pb2.SearchRequest(text="-dog + img:cat/0000.jpg:-1", k=5))
    assert code == grpc.StatusCode.NOT_FOUND and "cat/0000.jpg:-1" in details  # an unquoted id runs to the space
    code, details = status_of(search, gateway_pb2.SearchRequest(text='-dog - img:"cat/0000.jpg"', k=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "positive" in details
    code, _ = status_of(search, gateway_pb2.SearchRequest(text="dog", k=5, terms=[
        gateway_pb2.QueryTerm(image=b"\xff\xd8 not a jpeg")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = status_of(search, gateway_pb2.SearchRequest(text="dog", k=5, terms=[
        gateway_pb2.QueryTerm(image=b"\0" * (LIMIT + 1))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    photo = (cifar / "test" / "cat" / "0001.jpg").read_bytes()
    assert status_of(search, gateway_pb2.SearchRequest(text="dog", k=5, terms=[
        gateway_pb2.QueryTerm(image=photo)]))[0] == grpc.StatusCode.OK


def test_the_cli_adds_a_photo_with_like_and_explains(services, cifar, capsys, tmp_path):
    photo = cifar / "test" / "ship" / "0001.jpg"
    argv = ["--gateway", services.gateway, "search", "water", "--like", str(photo), "--like-weight", "2", "-k", "3"]
    assert cli.main([*argv, "--explain", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["query"] == "water + like 0001.jpg" and len(document["results"]) == 3
    for result in document["results"]:
        explanation = result["explanation"]
        assert [(s["term"], s["weight"]) for s in explanation["shares"]] == [("water", 1.0), ("0001.jpg", 2.0)]
        assert sum(s["share"] for s in explanation["shares"]) == pytest.approx(result["score"], abs=1e-5)
        assert len(explanation["words"]) == 5
    assert cli.main([*argv, "--explain", "--html", str(tmp_path / "page.html")]) == 0
    table = capsys.readouterr().out
    assert table.count("= water ") == 3 and table.count("words: ") == 3
    assert (tmp_path / "page.html").read_text().count("; words: ") == 3


def test_the_web_api_takes_like_ids_and_explains(web):
    from tests.test_web import assert_error, request

    answer = request(web.url, "GET", "/api/search?q=water&like=ship/0000.jpg&like_weight=2&k=4&explain=true")
    assert answer.status == 200, answer.body
    document = answer.json()
    assert document["query"] == "water + like ship/0000.jpg" and len(document["results"]) == 4
    for result in document["results"]:
        shares = result["explanation"]["shares"]
        assert [(s["term"], s["weight"]) for s in shares] == [("water", 1.0), ("img:ship/0000.jpg", 2.0)]
        assert sum(s["share"] for s in shares) == pytest.approx(result["score"], abs=1e-5)
    plain = request(web.url, "GET", "/api/search?q=water&k=4").json()
    assert all("explanation" not in r for r in plain["results"])
    similar = request(web.url, "POST", "/api/similar?k=3&explain=true", json.dumps({"id": "ship/0000.jpg"}).encode(),
                      {"Content-Type": "application/json"}).json()
    assert all(len(r["explanation"]["words"]) == 5 for r in similar["results"])
    assert_error(request(web.url, "GET", "/api/search?k=4"), 400, "INVALID_ARGUMENT", "like")
    assert_error(request(web.url, "GET", "/api/search?q=dog&like=no/such.jpg"), 404, "NOT_FOUND", "no/such.jpg")
