"""The HTTP/JSON API over the real gateway, encoder and index: the CLI's JSON, uploads, images by id
only, the gRPC -> HTTP status mapping, the upload limit and the token passed through."""

from __future__ import annotations

import http.client
import io
import json
import os
import sys
import uuid
from contextlib import closing
from pathlib import Path
from urllib.parse import quote, urlsplit

import grpc
import pytest
from PIL import Image

from services.common.wait_ready import wait_serving
from services.gateway import cli
from services.gateway import server as gateway_server
from services.web import errors
from services.web import server as web_server
from services.web.app import MAX_UPLOAD_BYTES, TOKEN_COOKIE

TOKEN = "web-test-token-0123"


class Answer:
    def __init__(self, response: http.client.HTTPResponse):
        self.status, self.headers, self.body = response.status, response.headers, response.read()

    def json(self):
        return json.loads(self.body)


def request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Answer:
    """One HTTP request, the path sent exactly as given (no dot-segment clean-up, as a hostile client would)."""
    address = urlsplit(base)
    with closing(http.client.HTTPConnection(address.hostname, address.port, timeout=60)) as connection:
        connection.request(method, path, body=body, headers=headers or {})
        return Answer(connection.getresponse())


def multipart(data: bytes, filename: str = "photo.jpg", field: str = "image") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def photo(cifar: Path, label: str) -> Path:
    return sorted((cifar / "test" / label).iterdir())[0]


def assert_error(answer: Answer, status: int, code: str, *words: str) -> None:
    assert answer.status == status, answer.body
    document = answer.json()
    assert set(document) == {"error", "code"} and document["code"] == code
    assert all(word in document["error"] for word in words), document


# --- the documents -------------------------------------------------------------------------------

def test_search_returns_the_clis_json_document(web, services, capsys):
    answer = request(web.url, "GET", "/api/search?q=dog&k=5")
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    assert cli.main(["--gateway", services.gateway, "search", "dog", "-k", "5", "--json"]) == 0
    assert answer.body.decode() == capsys.readouterr().out.rstrip("\n")  # byte for byte
    results = answer.json()["results"]
    assert len(results) == 5 and sum(r["label"] == "dog" for r in results) >= 4


def test_query_language_and_min_score(web):
    weighted = request(web.url, "GET", "/api/search?" + "q=" + quote("horse:2 saddle") + "&k=10").json()
    assert weighted["query"] == "horse:2 saddle" and sum(r["label"] == "horse" for r in weighted["results"]) >= 6
    minus = request(web.url, "GET", "/api/search?q=" + quote("frog+pond-bird") + "&k=10").json()
    assert sum(r["label"] == "frog" for r in minus["results"]) >= 6
    filtered = request(web.url, "GET", "/api/search?q=airplane&k=50&min_score=0.5").json()["results"]
    assert filtered and all(r["score"] >= 0.5 for r in filtered)


def test_similar_to_an_indexed_photo_by_id(web):
    first = request(web.url, "GET", "/api/search?q=ship&k=1").json()["results"][0]
    answer = request(web.url, "POST", "/api/similar?k=8", json.dumps({"id": first["id"]}).encode(),
                     {"Content-Type": "application/json"})
    document = answer.json()
    assert answer.status == 200 and document["query"] == first["id"] and len(document["results"]) == 8
    assert first["id"] not in {r["id"] for r in document["results"]}
    assert sum(r["label"] == "ship" for r in document["results"]) >= 5


def test_upload_a_photo_for_its_tags_and_similar_photos(web, cifar):
    ship = photo(cifar, "ship")
    body, headers = multipart(ship.read_bytes(), ship.name)
    tags = request(web.url, "POST", "/api/tag?k=5", body, headers)
    assert tags.status == 200 and len(tags.json()["tags"]) == 5
    assert "ship" in [t["word"] for t in tags.json()["tags"]], tags.json()
    similar = request(web.url, "POST", "/api/similar?k=6", body, headers).json()
    assert similar["query"] == ship.name and sum(r["label"] == "ship" for r in similar["results"]) >= 4
    raw = request(web.url, "POST", "/api/similar?k=6", ship.read_bytes(), {"Content-Type": "image/jpeg"}).json()
    assert [r["id"] for r in raw["results"]] == [r["id"] for r in similar["results"]]


def test_similar_words(web):
    words = [w["word"] for w in request(web.url, "GET", "/api/words?word=said&k=10").json()["words"]]
    assert {"told", "spokesman"} <= set(words) and "said" not in words


def test_the_page_and_the_openapi_document(web):
    page = request(web.url, "GET", "/?q=cat+sofa")
    assert page.status == 200 and b'id="search-form"' in page.body
    script = request(web.url, "GET", "/static/app.js")
    assert script.status == 200 and b"/api/search" in script.body
    paths = request(web.url, "GET", "/openapi.json").json()["paths"]
    assert {"/api/search", "/api/similar", "/api/tag", "/api/words", "/api/images/{image_id}",
            "/api/images/{image_id}/thumbnail", "/healthz"} <= set(paths)


def test_healthz_follows_the_gateway(web):
    answer = request(web.url, "GET", "/healthz")
    assert answer.status == 200 and answer.json() == {"status": "SERVING"}


# --- images by id only -----------------------------------------------------------------------------

def test_an_indexed_image_and_its_cached_thumbnail(web):
    hit = request(web.url, "GET", "/api/search?q=cat&k=1").json()["results"][0]
    original = request(web.url, "GET", "/api/images/" + quote(hit["id"]))
    assert original.status == 200 and original.body == Path(hit["path"]).read_bytes()
    assert original.headers["content-type"] == "image/jpeg"
    small = request(web.url, "GET", "/api/images/" + quote(hit["id"]) + "/thumbnail")
    assert small.status == 200 and small.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(small.body)) as image:
        assert image.format == "JPEG" and max(image.size) <= 256
    made = {p: p.stat().st_mtime_ns for p in web.thumbnails.glob("*.jpg")}
    assert len(made) >= 1
    again = request(web.url, "GET", "/api/images/" + quote(hit["id"]) + "/thumbnail")
    assert again.body == small.body and {p: p.stat().st_mtime_ns for p in web.thumbnails.glob("*.jpg")} == made


_opened: list[str] | None = None


def _record_opens(event: str, args) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)

PATH_LIKE = ["..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd", "..%5C..%5Cetc%5Cpasswd",
             "file%3A%2F%2F%2Fetc%2Fpasswd", "%2E%2E/%2E%2E/etc/passwd"]


@pytest.mark.parametrize("suffix", ["", "/thumbnail"])
def test_path_like_ids_are_not_found_and_open_no_file(web, suffix):
    global _opened
    _opened = []
    try:
        answers = [request(web.url, "GET", f"/api/images/{path}{suffix}") for path in PATH_LIKE]
        with open(os.devnull, "rb"):  # the hook does see opens
            pass
        opened = list(_opened)
    finally:
        _opened = None
    for path, answer in zip(PATH_LIKE, answers):
        assert answer.status == 404, (path, answer.body)
        assert answer.json()["code"] == "NOT_FOUND"
    assert os.devnull in opened
    assert [name for name in opened if "passwd" in name or name.startswith("/etc")] == []


# --- gRPC status -> HTTP status ----------------------------------------------------------------------

def test_invalid_arguments_are_400(web):
    assert_error(request(web.url, "GET", "/api/search?q=dog&k=0"), 400, "INVALID_ARGUMENT", "k must be")
    assert_error(request(web.url, "GET", "/api/search?q=dog&min_score=2"), 400, "INVALID_ARGUMENT", "min_score")
    assert_error(request(web.url, "GET", "/api/search?q=dog&k=ten"), 400, "INVALID_ARGUMENT", "k")
    assert_error(request(web.url, "GET", "/api/search"), 400, "INVALID_ARGUMENT", "q")
    assert_error(request(web.url, "POST", "/api/tag", b"not an image", {"Content-Type": "image/jpeg"}),
                 400, "INVALID_ARGUMENT")
    assert_error(request(web.url, "POST", "/api/tag", b"", {"Content-Type": "image/jpeg"}), 400, "INVALID_ARGUMENT")
    assert_error(request(web.url, "POST", "/api/similar", b'{"name": 1}', {"Content-Type": "application/json"}),
                 400, "INVALID_ARGUMENT", '"id"')


def test_unknown_words_and_ids_are_404_naming_them(web):
    assert_error(request(web.url, "GET", "/api/search?q=" + quote("cat blorfwumpus")), 404, "NOT_FOUND", "blorfwumpus")
    assert_error(request(web.url, "GET", "/api/words?word=blorfwumpus"), 404, "NOT_FOUND", "blorfwumpus")
    assert_error(request(web.url, "POST", "/api/similar", b'{"id": "ship/nope.jpg"}', {"Content-Type": "application/json"}),
                 404, "NOT_FOUND", "ship/nope.jpg")


def declared_only(base: str, length: int, content_type: str) -> Answer:
    """Headers announcing a body of `length` bytes, and none of it: the answer must not wait for it."""
    address = urlsplit(base)
    with closing(http.client.HTTPConnection(address.hostname, address.port, timeout=60)) as connection:
        connection.putrequest("POST", "/api/tag")
        connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        return Answer(connection.getresponse())


def test_uploads_over_16_mib_are_413(web):
    assert_error(declared_only(web.url, MAX_UPLOAD_BYTES + 1, "image/jpeg"), 413, "RESOURCE_EXHAUSTED", "16 MiB")
    assert_error(declared_only(web.url, MAX_UPLOAD_BYTES + 1, "multipart/form-data; boundary=x"),
                 413, "RESOURCE_EXHAUSTED", "16 MiB")
    # exactly at the web limit the gRPC message (bytes + framing) is over 16 MiB: RESOURCE_EXHAUSTED -> 413
    assert_error(request(web.url, "POST", "/api/tag", b"\xff" * MAX_UPLOAD_BYTES, {"Content-Type": "image/jpeg"}),
                 413, "RESOURCE_EXHAUSTED")


def test_a_chunked_upload_over_the_limit_is_413(web):
    address = urlsplit(web.url)
    with closing(http.client.HTTPConnection(address.hostname, address.port, timeout=60)) as connection:
        chunks = (b"\xff" * 2**20 for _ in range(17))
        connection.request("POST", "/api/tag", body=chunks, headers={"Content-Type": "image/jpeg"},
                           encode_chunked=True)
        answer = Answer(connection.getresponse())
    assert_error(answer, 413, "RESOURCE_EXHAUSTED")


def test_a_gateway_that_is_down_is_503(tmp_path):
    with web_server.run_server(0, "127.0.0.1:1", thumbnails=tmp_path, timeout=5) as (_, port):  # nothing on port 1
        base = f"http://127.0.0.1:{port}"
        assert_error(request(base, "GET", "/healthz"), 503, "UNAVAILABLE")
        assert_error(request(base, "GET", "/api/search?q=dog"), 503, "UNAVAILABLE")
        assert_error(request(base, "GET", "/api/images/ship/0000.jpg"), 503, "UNAVAILABLE")


@pytest.fixture(scope="module")
def guarded(services, tmp_path_factory) -> str:
    """A second gateway over the same encoder and index that requires a token, and a web service on it."""
    with gateway_server.run_server(0, services.encoder, services.index, tokens=[TOKEN]) as (_, gateway_port), \
            web_server.run_server(0, f"127.0.0.1:{gateway_port}",
                                  thumbnails=tmp_path_factory.mktemp("guarded")) as (_, port):
        wait_serving(f"127.0.0.1:{gateway_port}")
        yield f"http://127.0.0.1:{port}"


def test_the_token_is_required_and_passed_through(guarded):
    assert_error(request(guarded, "GET", "/api/search?q=dog&k=3"), 401, "UNAUTHENTICATED", "missing credentials")
    wrong = request(guarded, "GET", "/api/search?q=dog&k=3", headers={"Authorization": "Bearer wrong"})
    assert_error(wrong, 401, "UNAUTHENTICATED", "invalid bearer token")
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert_error(request(guarded, "GET", "/api/search?q=dog", headers={"Authorization": "Basic abc"}),
                 401, "UNAUTHENTICATED", "Bearer")
    assert_error(request(guarded, "GET", "/api/images/ship/0000.jpg/thumbnail"), 401, "UNAUTHENTICATED")
    ok = request(guarded, "GET", "/api/search?q=dog&k=3", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200 and len(ok.json()["results"]) == 3
    hit = ok.json()["results"][0]
    cookie = request(guarded, "GET", "/api/images/" + quote(hit["id"]) + "/thumbnail",
                     headers={"Cookie": f"{TOKEN_COOKIE}={TOKEN}"})
    assert cookie.status == 200 and cookie.headers["content-type"] == "image/jpeg"
    assert request(guarded, "GET", "/healthz").status == 200  # probes need no token, like gRPC health
    assert request(guarded, "GET", "/").status == 200  # the page itself holds no data


def test_every_mapped_code_has_its_status():
    """The table the handlers use, for codes the tests above cannot provoke from a healthy stack."""
    assert {code.name: status for code, status in errors.HTTP_STATUS.items()} == {
        "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
        "RESOURCE_EXHAUSTED": 413, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INTERNAL

        def details(self):
            return "boom"

    response = errors.from_rpc_error(Failed())
    assert response.status_code == 500 and json.loads(response.body) == {"error": "boom", "code": "INTERNAL"}
