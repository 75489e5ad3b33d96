"""Which items a search may return: a filter by label, folder and time taken, and a paging cursor.

Results are ranked by score, then by id, both descending (the order of every merge); a cursor keeps
only the items ranked after the last one a previous page returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from services.common import bounds
from services.common.items import Item

MAX_LABELS = 64  # labels in one filter
MAX_FOLDER_CHARS = 1000


def folder_prefix(folder: str) -> str:
    """`2024`, `2024/` and `/2024/` all mean the ids under the folder 2024: the prefix `2024/`."""
    stripped = folder.strip("/")
    return stripped + "/" if stripped else ""


@dataclass(frozen=True)
class Cursor:
    score: float
    id: str
    skipped: int = 0  # results on the pages before: how deep the next page starts

    def passes(self, score: float, item_id: str) -> bool:
        return score < self.score or (score == self.score and item_id < self.id)


@dataclass(frozen=True)
class Selection:
    labels: frozenset[str] = frozenset()
    folder: str = ""  # a prefix as folder_prefix gives it
    since: float | None = None  # taken at or after (seconds since 1970)
    until: float | None = None  # taken before
    cursor: Cursor | None = None

    @property
    def filters(self) -> bool:
        return bool(self.labels or self.folder or self.since is not None or self.until is not None)

    @property
    def skipped(self) -> int:
        return self.cursor.skipped if self.cursor else 0

    def keeps(self, item: Item, score: float) -> bool:
        return (not self.labels or item.label in self.labels) and item.id.startswith(self.folder) and \
            self.keeps_time(item.taken) and (self.cursor is None or self.cursor.passes(score, item.id))

    def keeps_time(self, taken: float | None) -> bool:
        if self.since is None and self.until is None:
            return True
        return taken is not None and (self.since is None or taken >= self.since) and \
            (self.until is None or taken < self.until)


EVERYTHING = Selection()


def selection_problem(labels: list[str], folder: str, cursor: Cursor | None,
                      times: tuple[float | None, float | None] = (None, None)) -> str | None:
    """What is wrong with a request's filter or cursor, else None."""
    if len(labels) > MAX_LABELS:
        return f"{len(labels)} labels in one filter; the limit is {MAX_LABELS}"
    for label in labels:
        problem = bounds.label_problem(label)
        if problem:
            return problem
    if len(folder) > MAX_FOLDER_CHARS:
        return f"the folder is {len(folder)} characters; the limit is {MAX_FOLDER_CHARS}"
    if cursor is not None and (not math.isfinite(cursor.score) or cursor.skipped < 0):
        return "the paging cursor is malformed"
    if any(time is not None and not math.isfinite(time) for time in times):
        return "a time bound is not a finite number"
    return None
