"""What part of the image index a Search or SimilarImages request asks for: its filter (labels, folder,
time taken) and its page.

A page token names the artifact version of the first page and the last result given so far; the next
page is the results ranked after it in that version (the index keeps only those), so pages never
overlap. It is opaque to clients: URL-safe base64 of a small JSON list.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

from semsearch.v1 import index_pb2
from services.common.taken import parse_time


class BadScope(ValueError):
    """A malformed page token or time bound; the message names it."""


@dataclass(frozen=True)
class PageToken:
    version: str
    score: float
    id: str
    skipped: int  # results on the pages before the next one

    def encode(self) -> str:
        text = json.dumps([self.version, self.score, self.id, self.skipped], separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> "PageToken":
        try:
            version, score, item_id, skipped = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if not (isinstance(version, str) and isinstance(item_id, str) and isinstance(skipped, int)
                    and isinstance(score, (int, float)) and math.isfinite(score) and skipped >= 0):
                raise TypeError
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
            raise BadScope(f"page_token {token[:40]!r} is malformed; pass next_page_token as it came") from None
        return cls(version, float(score), item_id, skipped)


def _time(name: str, text: str) -> float | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise BadScope(f"{name} {text[:40]!r} is not a date or time; write it as 2024-06-01 or "
                       "2024-06-01T18:00") from None


@dataclass(frozen=True)
class Scope:
    """A request's filter and page, as the index requests carry them."""

    labels: tuple[str, ...] = ()
    folder: str = ""
    since: float | None = None
    until: float | None = None
    page: PageToken | None = None

    @classmethod
    def of(cls, request) -> "Scope":
        """From a SearchRequest or SimilarImagesRequest; BadScope for a malformed token or time."""
        page = PageToken.decode(request.page_token) if request.page_token else None
        return cls(tuple(request.labels), request.folder, _time("after", request.after),
                   _time("before", request.before), page)

    @property
    def version(self) -> str:
        """The artifact version a next page must come from ("" on a first page: the current one)."""
        return self.page.version if self.page else ""

    def apply(self, request: index_pb2.IndexSearchRequest) -> index_pb2.IndexSearchRequest:
        request.labels.extend(self.labels)
        request.folder = self.folder
        if self.since is not None:
            request.taken_since = self.since
        if self.until is not None:
            request.taken_until = self.until
        if self.page:
            request.after.CopyFrom(index_pb2.Cursor(score=self.page.score, id=self.page.id, skipped=self.page.skipped))
        return request

    def next_token(self, response: index_pb2.IndexSearchResponse, k: int) -> str:
        """The token of the page after `response`, or "" when it was the last (not full)."""
        if len(response.neighbors) < k:
            return ""
        last = response.neighbors[-1]
        skipped = (self.page.skipped if self.page else 0) + k
        return PageToken(response.artifact_version, last.score, last.id, skipped).encode()
