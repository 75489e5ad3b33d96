"""Filters (label, folder, time) and pages through the real services: the session artifact's 1,000 CIFAR-10 photos, ids
`<label>/<file>`, searched over gRPC, the CLI and the web API."""

import json
from urllib.parse import urlencode

import grpc
import pytest

from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import cli
from services.gateway.client import Client
from tests.test_web import request


@pytest.fixture(scope="module")
def client(services):
    with Client(services.gateway) as client:
        yield client


def test_a_label_or_folder_filter_keeps_only_its_images_and_still_gives_k(client):
    for hits in (client.search("dog", k=20, labels=["cat"]), client.search("dog", k=20, folder="cat"),
                 client.search("dog", k=20, folder="/cat/", labels=["cat", "ship"])):
        assert len(hits) == 20 and all(h.label == "cat" and h.id.startswith("cat/") for h in hits)
    # The filtered answer is the unfiltered ranking with the others left out.
    everything = client.search("dog", k=1000)
    assert [h.id for h in client.search("dog", k=20, labels=["cat"])] == \
        [h.id for h in everything if h.label == "cat"][:20]
    both = client.search("vehicle", k=30, labels=["truck", "automobile"])
    assert {h.label for h in both} == {"truck", "automobile"}


def test_unknown_label_or_folder_is_an_empty_answer_not_an_error(client):
    assert client.search("dog", k=10, labels=["unicorn"]) == []
    assert client.search("dog", k=10, folder="2031/") == []


def test_pages_follow_each_other_and_end(client):
    whole = [h.id for h in client.search("animal", k=60)]
    seen, token = [], ""
    for _ in range(3):
        page = client.search("animal", k=20, page_token=token)
        seen += [h.id for h in page]
        token = page.next_page_token
    assert seen == whole and len(set(seen)) == 60
    # Filtered pages: 100 cat photos in pages of 40 are 40, 40, 20, and the last has no next token.
    sizes, token = [], ""
    while True:
        page = client.search("animal", k=40, labels=["cat"], page_token=token)
        sizes.append(len(page))
        token = page.next_page_token
        if not token:
            break
    assert sizes == [40, 40, 20]


def test_similar_images_by_id_filtered_and_paged(client):
    query = client.search("cat", k=1, labels=["cat"])[0].id
    first = client.similar(id=query, k=10, labels=["dog"])
    second = client.similar(id=query, k=10, labels=["dog"], page_token=first.next_page_token)
    assert all(h.label == "dog" for h in first + second) and not {h.id for h in first} & {h.id for h in second}
    assert [h.id for h in first + second] == [h.id for h in client.similar(id=query, k=20, labels=["dog"])]


@pytest.mark.parametrize("token", ["not base64 !", "bm90IGpzb24", "WyJ2IiwgMSwgImEiXQ"])
def test_a_malformed_page_token_is_invalid_argument_naming_it(services, token):
    with grpc.insecure_channel(services.gateway) as channel:
        with pytest.raises(grpc.RpcError) as error:
            gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(text="dog", k=5, page_token=token),
                                                         timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in error.value.details()


def test_a_page_token_of_a_version_no_longer_served_is_failed_precondition(client):
    from services.gateway.paging import PageToken

    token = PageToken("20200101T000000Z-gone00", 0.5, "cat/0001.jpg", 10).encode()
    with pytest.raises(grpc.RpcError) as error:
        client.search("dog", k=5, page_token=token)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "first page" in error.value.details()


def test_cli_filters_and_pages(services, client, capsys):
    assert cli.main(["--gateway", services.gateway, "search", "dog", "-k", "5", "--label", "cat", "--label", "ship",
                     "--page", "2", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    expected = [h.id for h in client.search("dog", k=10, labels=["cat", "ship"])][5:]
    assert [r["id"] for r in document["results"]] == expected and document["next_page_token"]
    assert cli.main(["--gateway", services.gateway, "search", "dog", "--folder", "nowhere", "--page", "3"]) == 0
    assert "(no results)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--gateway", services.gateway, "search", "dog", "--page", "0"])
    assert "numbered from 1" in capsys.readouterr().err


def test_web_api_filters_and_pages(web, client):
    def get(**params):
        return request(web.url, "GET", "/api/search?" + urlencode(params, doseq=True))

    first = get(q="dog", k=5, label=["cat", "ship"]).json()
    second = get(q="dog", k=5, label=["cat", "ship"], page_token=first["next_page_token"]).json()
    expected = [h.id for h in client.search("dog", k=10, labels=["cat", "ship"])]
    assert [r["id"] for r in first["results"] + second["results"]] == expected
    bad = get(q="dog", page_token="!!")
    assert bad.status == 400 and "page_token" in bad.json()["error"]


def test_a_time_range_through_the_gateway_and_the_cli(services, client, capsys):
    """Every indexed photo has a time (here its file's: CIFAR-10 JPEGs carry no EXIF)."""
    everything = [h.id for h in client.search("dog", k=20)]
    assert [h.id for h in client.search("dog", k=20, after="1971-01-01", before="2999-01-01")] == everything
    assert client.search("dog", k=20, after="2999-01-01") == []
    for bad in ({"after": "June"}, {"before": "2024-13-01"}):
        with pytest.raises(grpc.RpcError) as error:
            client.search("dog", k=5, **bad)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and next(iter(bad)) in error.value.details()
    assert cli.main(["--gateway", services.gateway, "search", "dog", "--after", "2999-01-01"]) == 0
    assert "(no results)" in capsys.readouterr().out
