"""The API's documented shapes for OpenAPI: the CLI's `--json` documents, the error body and the upload bodies."""

from __future__ import annotations

from pydantic import BaseModel


class ImageResult(BaseModel):
    id: str
    path: str
    label: str | None
    score: float


class ImageResults(BaseModel):
    query: str
    results: list[ImageResult]
    next_page_token: str | None = None  # pass as page_token for the results after these


class WordResult(BaseModel):
    word: str
    score: float


class Tags(BaseModel):
    tags: list[WordResult]


class Words(BaseModel):
    words: list[WordResult]


class Error(BaseModel):
    error: str
    code: str


ERRORS = {status: {"model": Error} for status in (400, 401, 404, 413, 503)}
UPLOAD_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}},
                                       "required": ["image"]}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
SIMILAR_BODY = {"requestBody": {"content": {
    **UPLOAD_BODY["requestBody"]["content"],
    "application/json": {"schema": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
}}}
