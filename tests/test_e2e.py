"""End to end on the real model: batch-trained artifact -> services -> client and `semsearch` CLI."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from services.gateway.client import Client
from tests.helpers import ANIMAL, Kinds

CLI = [sys.executable, "-m", "services.gateway.cli"]


@pytest.fixture(scope="module")
def client(services):
    with Client(services.gateway) as client:
        yield client


def semsearch(services, *args, check=True):
    env = {**os.environ, "SEMSEARCH_GATEWAY": services.gateway}
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_words_said_are_the_glove_neighbours(services):
    answer = json.loads(semsearch(services, "words", "said", "-k", "10", "--json").stdout)
    words = [w["word"] for w in answer["words"]]
    assert {"told", "spokesman"} <= set(words) and "said" not in words
    assert [w["score"] for w in answer["words"]] == sorted((w["score"] for w in answer["words"]), reverse=True)


def test_search_ship_returns_ship_photos(services):
    answer = json.loads(semsearch(services, "search", "ship", "-k", "10", "--json").stdout)
    assert answer["query"] == "ship" and len(answer["results"]) == 10
    assert set(answer["results"][0]) == {"id", "path", "label", "score"}
    assert sum(r["label"] == "ship" for r in answer["results"]) >= 8
    assert all(os.path.isfile(r["path"]) for r in answer["results"])


@pytest.mark.parametrize("query, label", [("dog", "dog"), ("truck", "truck"), ("cat sofa", "cat"),
                                          ("horse:2 saddle", "horse"), ("frog+pond-bird", "frog")])
def test_text_queries_find_their_label(client, query, label):
    labels = Counter(hit.label for hit in client.search(query, k=10))
    assert labels[label] >= 6, labels


@pytest.mark.parametrize("word, label", [("ocean", "ship"), ("puppy", "dog"), ("jet", "airplane"),
                                         ("lorry", "truck"), ("kitten", "cat")])
def test_words_never_trained_on_retrieve_the_related_label(client, word, label):
    labels = Counter(hit.label for hit in client.search(word, k=10))
    assert labels[label] >= 6, labels


def test_min_score_filters(client):
    hits = client.search("airplane", k=50, min_score=0.5)
    assert hits and all(h.score >= 0.5 for h in hits)
    assert len(client.search("airplane", k=50, min_score=0.999)) < len(hits)


def test_tags_of_unseen_test_photos(client, cifar):
    """Photos from the test split (never trained on): the true class word should be among the top tags."""
    hits, total = 0, 0
    for label_dir in sorted((cifar / "test").iterdir()):
        for photo in sorted(label_dir.iterdir())[:10]:
            tags = [t.word for t in client.tag(photo.read_bytes(), k=5)]
            hits += label_dir.name in tags
            total += 1
    assert hits / total >= 0.7, f"{hits}/{total}"


def test_tag_and_similar_through_the_cli(services, cifar):
    """What a user checks: a dog photo (from the test split, never trained on) is tagged with dog words and
    finds dogs. Measured: dog, cat, horse, dogs, boy; four dogs."""
    photo = str(cifar / "test" / "dog" / "0001.jpg")
    tags = json.loads(semsearch(services, "tag", photo, "-k", "5", "--json").stdout)
    assert len(tags["tags"]) == 5 and set(tags["tags"][0]) == {"word", "score"}
    words = [t["word"] for t in tags["tags"]]
    kinds = Kinds()
    assert words[0] == "dog" and sum(kinds.is_a(word, ANIMAL) for word in words) >= 3, words
    assert [t["score"] for t in tags["tags"]] == sorted((t["score"] for t in tags["tags"]), reverse=True)
    similar = json.loads(semsearch(services, "similar", photo, "-k", "4", "--json").stdout)
    assert similar["query"] == photo and len(similar["results"]) == 4
    labels = [r["label"] for r in similar["results"]]
    assert labels[0] == "dog" and labels.count("dog") >= 3, labels


def test_readable_table_and_html_gallery(services, tmp_path):
    page = tmp_path / "gallery.html"
    result = semsearch(services, "search", "cat", "-k", "3", "--html", str(page))
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "score", "label", "id"] and len(lines) == 4
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3 and "search: cat" in html


def test_cli_errors_are_one_clear_line(services, tmp_path):
    unknown = semsearch(services, "search", "qqzzyx", check=False)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "semsearch: NOT_FOUND: unknown word: qqzzyx"
    missing = semsearch(services, "tag", str(tmp_path / "nope.jpg"), check=False)
    assert missing.returncode != 0 and "cannot read image" in missing.stderr
    down = subprocess.run([*CLI, "--gateway", "127.0.0.1:1", "--timeout", "2", "words", "said"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


_opened: list[str] | None = None


def _record_opens(event: str, args) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


def test_cli_reads_result_images_only_for_the_html_page(services, tmp_path, capsys):
    """Without --html the CLI prints the answer and opens no photo; --html reads them into the page."""
    from services.gateway import cli

    global _opened
    page = tmp_path / "page.html"
    try:
        _opened = []
        assert cli.main(["--gateway", services.gateway, "search", "ship", "-k", "20", "--json"]) == 0
        plain = list(_opened)
        _opened = []
        assert cli.main(["--gateway", services.gateway, "search", "ship", "-k", "20", "--html", str(page)]) == 0
        with_page = list(_opened)
    finally:
        _opened = None
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["results"]
    assert len(hits) == 20 and [p for p in plain if p.endswith(".jpg")] == []
    assert {hit["path"] for hit in hits} <= set(with_page) and page.read_text().count("<img") == 20
