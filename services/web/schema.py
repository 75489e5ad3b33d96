"""The API's documented shapes for OpenAPI: the CLI's `--json` documents, the error body and the upload bodies."""

from __future__ import annotations

from pydantic import BaseModel


class TermShare(BaseModel):
    term: str
    weight: float
    share: float  # of the score; a result's shares add up to its score


class ClassResult(BaseModel):
    name: str
    score: float


class Explanation(BaseModel):
    shares: list[TermShare]
    words: list["WordResult"]  # the photo's 5 nearest words: its own top tags
    classes: list[ClassResult]  # its 3 nearest ImageNet classes (conse, hybrid, gated; none in devise)


class ImageResult(BaseModel):
    id: str
    path: str
    label: str | None
    score: float
    explanation: Explanation | None = None  # only with explain=true


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


Explanation.model_rebuild()
