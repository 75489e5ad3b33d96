"""The HTTP/JSON API and the page: a thin layer over the gateway's gRPC client.

Every handler turns its request into one gateway call and the answer into the CLI's `--json`
document; gRPC errors become HTTP statuses (errors.py). Images are served by id only: the gateway
says where an indexed image's file is, so no path ever comes from the request.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import unquote

import grpc
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from services.common.image_terms import DEFAULT_IMAGE_WEIGHT
from services.gateway.cli import image_json, word_json
from services.gateway.client import Client
from services.web import errors, images
from services.web.metrics import RequestMetrics, WebMetrics
from services.web.schema import ERRORS, SIMILAR_BODY, UPLOAD_BODY, Error, ImageResults, Tags, Words

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 16 * 1024 * 1024
TOKEN_COOKIE = "semsearch_token"
LABEL = "only images with this label (repeat for any of several)"
FOLDER = "only images whose id is under this folder (2024/)"
PAGE = "the previous answer's next_page_token, for the results after it"
AFTER = "only images taken on or after this date or time (2024-06-01, 2024-06-01T18:00; UTC)"
BEFORE = "only images taken before this date or time"
LIKE = "an indexed image id to add to the query, like img:ID in q (repeat for several)"
LIKE_WEIGHT = f"the weight of each `like` image (default {DEFAULT_IMAGE_WEIGHT:g}; a word's is 1)"
EXPLAIN = "explain each result: each query term's share of its score, its nearest words and ImageNet classes"
STATIC = Path(__file__).parent / "static"
HEALTH_TIMEOUT = 2.0
IMAGE_CACHE = "private, max-age=3600"


class CliJson(JSONResponse):
    """JSON written as the CLI's `--json` writes it, so an API answer is byte for byte the CLI's output."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False).encode("utf-8")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413, counted as it arrives
    (a Content-Length over the limit is refused before any of it is read)."""

    def __init__(self, app, limit: int = MAX_UPLOAD_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = errors.error_response(413, "RESOURCE_EXHAUSTED", self._message())
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(413, "RESOURCE_EXHAUSTED", self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is over the limit of {self.limit // 2**20} MiB"


def _token(request: Request) -> str | None:
    """The caller's bearer token (Authorization header, else the page's cookie), passed on to the gateway."""
    header = request.headers.get("authorization")
    if header is None:
        return unquote(request.cookies.get(TOKEN_COOKIE, "")) or None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "UNAUTHENTICATED", "malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


async def _upload(request: Request) -> tuple[bytes, str]:
    """(bytes, file name) of the photo: the form field `image`, or the whole body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=4)
        except MultiPartException as error:
            raise ApiError(400, "INVALID_ARGUMENT", f"malformed form: {error.message}") from None
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "INVALID_ARGUMENT", "send the photo as the form field 'image'")
        data, name = await upload.read(), upload.filename or "upload"
    else:
        data, name = await request.body(), "upload"
    if not data:
        raise ApiError(400, "INVALID_ARGUMENT", "the request holds no image")
    return data, name


def create_app(client: Client, thumbnails: Path, metrics: WebMetrics | None = None) -> FastAPI:
    """The API over `client` (a gateway client; each request may send its own token); thumbnails
    are cached in `thumbnails`; `metrics`, when given, counts and times every request."""
    app = FastAPI(title="semsearch", summary="Semantic image search: images for text, similar images, tags, "
                  "similar words", version="1", description="Errors: `{\"error\": ..., \"code\": gRPC code}` "
                  "with 400, 401, 404, 413 or 503.")
    app.add_middleware(BodyLimit)
    if metrics is not None:  # the outermost: the requests BodyLimit refuses are counted too
        app.add_middleware(RequestMetrics, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def gateway(request: Request) -> Client:
        token = _token(request)
        return client.with_token(token) if token else client

    @app.exception_handler(grpc.RpcError)
    async def rpc_error(_request, error: grpc.RpcError):
        return errors.from_rpc_error(error)

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return errors.error_response(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in error.errors())
        return errors.error_response(400, "INVALID_ARGUMENT", problems)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", responses={503: {"model": Error}})
    def healthz() -> dict:
        """SERVING (200) while the gateway reports SERVING; 503 otherwise."""
        try:
            status = health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT).status
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as error:
            name = error.code().name
        if name != "SERVING":
            return errors.error_response(503, "UNAVAILABLE", f"the gateway is {name}")
        return {"status": name}

    @app.get("/api/search", response_model=ImageResults, responses=ERRORS)
    def search(request: Request,
               q: str | None = Query(default=None, description="cat sofa, cat+sofa-dog, cat:2 sofa, dog + img:ID"),
               k: int = 10, min_score: float | None = None, label: list[str] = Query(default=[], description=LABEL),
               folder: str = Query(default="", description=FOLDER), page_token: str = Query(default="", description=PAGE),
               after: str = Query(default="", description=AFTER), before: str = Query(default="", description=BEFORE),
               like: list[str] = Query(default=[], description=LIKE),
               like_weight: float = Query(default=DEFAULT_IMAGE_WEIGHT, description=LIKE_WEIGHT),
               explain: bool = Query(default=False, description=EXPLAIN)):
        """Images for text, and for indexed images (`like`): the CLI's `search --json` document."""
        if q is None and not like:
            raise ApiError(400, "INVALID_ARGUMENT", "search needs q, like (an image id), or both")
        hits = gateway(request).search(q, k=k, min_score=min_score, labels=label, folder=folder, page_token=page_token,
                                       after=after, before=before, like_ids=like, like_weight=like_weight,
                                       explain=explain)
        return CliJson(image_json(" + ".join(([q] if q else []) + [f"like {item}" for item in like]), hits))

    @app.post("/api/similar", response_model=ImageResults, responses=ERRORS, openapi_extra=SIMILAR_BODY)
    async def similar(request: Request, k: int = 10, min_score: float | None = None,
                      label: list[str] = Query(default=[], description=LABEL),
                      folder: str = Query(default="", description=FOLDER),
                      page_token: str = Query(default="", description=PAGE),
                      after: str = Query(default="", description=AFTER),
                      before: str = Query(default="", description=BEFORE),
                      explain: bool = Query(default=False, description=EXPLAIN)):
        """Images similar to an uploaded photo, or to an indexed one given as `{"id": ...}`."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                image_id = json.loads(await request.body())["id"]
            except (ValueError, TypeError, KeyError):
                raise ApiError(400, "INVALID_ARGUMENT", 'expected a JSON body {"id": "<image id>"}') from None
            if not isinstance(image_id, str):
                raise ApiError(400, "INVALID_ARGUMENT", "the id must be a string")
            hits = await run_in_threadpool(gateway(request).similar, id=image_id, k=k, min_score=min_score,
                                           labels=label, folder=folder, page_token=page_token, after=after,
                                           before=before, explain=explain)
            return CliJson(image_json(image_id, hits))
        data, name = await _upload(request)
        hits = await run_in_threadpool(gateway(request).similar, data, k=k, min_score=min_score, labels=label,
                                       folder=folder, page_token=page_token, after=after, before=before,
                                       explain=explain)
        return CliJson(image_json(name, hits))

    @app.post("/api/tag", response_model=Tags, responses=ERRORS, openapi_extra=UPLOAD_BODY)
    async def tag(request: Request, k: int = 5):
        """The nearest words of the whole vocabulary for an uploaded photo."""
        data, _ = await _upload(request)
        return CliJson(word_json("tags", await run_in_threadpool(gateway(request).tag, data, k=k)))

    @app.get("/api/words", response_model=Words, responses=ERRORS)
    def words(request: Request, word: str, k: int = 10):
        """GloVe neighbours of a word."""
        return CliJson(word_json("words", gateway(request).words(word, k=k)))

    @app.get("/api/images/{image_id:path}/thumbnail", responses=ERRORS, response_class=Response)
    def thumbnail(request: Request, image_id: str):
        """A JPEG at most 256 pixels on a side of an indexed image (made once, then cached)."""
        hit = gateway(request).image(image_id)
        try:
            path = images.thumbnail(hit.path, thumbnails)
        except images.Unreadable as error:
            raise ApiError(404, "NOT_FOUND", f"image {image_id!r} is indexed but {error}") from None
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})

    @app.get("/api/images/{image_id:path}", responses=ERRORS, response_class=Response)
    def image(request: Request, image_id: str):
        """The file of an indexed image, by its id (`ship/0000.jpg`, `added/<hash>`)."""
        hit = gateway(request).image(image_id)
        try:
            kind = images.media_type(hit.path)
        except images.Unreadable as error:
            raise ApiError(404, "NOT_FOUND", f"image {image_id!r} is indexed but {error}") from None
        return FileResponse(hit.path, media_type=kind, headers={"Cache-Control": IMAGE_CACHE})

    return app
