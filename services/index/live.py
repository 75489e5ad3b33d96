"""Live updates of the image index: an append-only log beside the artifacts, and the index it yields.

    ARTIFACTS/live/images.log     one JSON line per add or delete, fsynced before the call returns
    ARTIFACTS/live/images/<hex>   the bytes of each added image, named by their sha256

The log is the truth: an index service applies it on top of the artifact it loads (at start, on
every artifact switch, and each time it polls, which also keeps replicas in step), and batch-train
folds it into the next artifact. Applying is idempotent and in log order, so replaying the whole
log over any artifact version gives the same membership as the last operation on each id.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np

from services.common import artifact
from services.common.errors import listed, quoted
from services.index.core import Hit, InvalidQuery, Item, UnknownId, check_k, check_min_score, merge, shard_of, unit_query

log = logging.getLogger(__name__)

LIVE_DIR = "live"
LOG_NAME = "images.log"
IMAGES_DIR = "images"
ID_PREFIX = "added/"
MAX_LABEL_CHARS = 100
_ID = re.compile(r"added/[0-9a-f]{24}")
_FILE = re.compile(IMAGES_DIR + r"/[0-9a-f]{64}")


def image_id(data: bytes) -> str:
    """The id of an added image: its content hash, so adding the same bytes twice is harmless."""
    return ID_PREFIX + hashlib.sha256(data).hexdigest()[:24]


def live_dir(artifact_root: Path) -> Path:
    return Path(artifact_root) / LIVE_DIR


@dataclass(frozen=True)
class Entry:
    op: str  # "add" or "delete"
    id: str
    label: str | None = None
    file: str = ""  # added images: the stored bytes, relative to the live folder
    vector: tuple[float, ...] = ()
    space: str = ""  # the word space the vector lives in: "<word-vector source>:<dimension>"


class LiveLog:
    """The log and the stored image bytes of one artifact root; writes are durable when they return."""

    def __init__(self, artifact_root: Path):
        self.directory = live_dir(artifact_root)
        self.path = self.directory / LOG_NAME

    def store_image(self, data: bytes) -> str:
        """Write the bytes under their hash (never a name from a request); returns the relative file name."""
        name = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}"
        target = self.directory / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}-{threading.get_ident()}.partial")
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
            artifact.fsync(target.parent)
        return name

    def append(self, entries: list[Entry]) -> None:
        """Append whole lines in one write under an exclusive lock, then fsync."""
        self.directory.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        data = "".join(json.dumps(_entry_dict(e), ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if _ends_torn(handle):  # a write that crashed half-way: end its line, never extend it
                    data = b"\n" + data
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        if created:
            artifact.fsync(self.directory)

    def read(self, offset: int = 0) -> tuple[list[Entry], int]:
        """Complete lines from byte `offset`: (entries, offset after the last complete line).

        A last line without its newline is a write that never returned (a crash mid-append): it is
        left for later, never half-applied.
        """
        try:
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        entries = []
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                entries.append(_entry_of(json.loads(line)))
            except ValueError as error:  # one bad line must not stop every replica from starting
                log.warning("%s: skipping a line that is not a log entry (%s): %.80r", self.path, error, line)
        return entries, offset + end


def _ends_torn(handle) -> bool:
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return False
    handle.seek(size - 1)
    return handle.read(1) != b"\n"


def _entry_dict(entry: Entry) -> dict:
    data = {"op": entry.op, "id": entry.id, "time": round(time.time(), 3)}
    if entry.op == "add":
        data.update(file=entry.file, vector=list(entry.vector), space=entry.space)
        if entry.label is not None:
            data["label"] = entry.label
    return data


def _entry_of(data) -> Entry:
    """A parsed line -> an Entry; ValueError for a torn write or anything not of the expected shape."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    op, item_id, label = data.get("op"), data.get("id"), data.get("label")
    if op not in ("add", "delete") or not isinstance(item_id, str) or not item_id:
        raise ValueError("needs 'op' (add or delete) and a string 'id'")
    if op == "delete":
        return Entry(op, item_id)
    file, vector, space = data.get("file"), data.get("vector"), data.get("space")
    if not (isinstance(file, str) and isinstance(space, str) and (label is None or isinstance(label, str))
            and isinstance(vector, list) and vector
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector)):
        raise ValueError("an add needs a string 'file' and 'space', a list of numbers 'vector', a string or no 'label'")
    if not _ID.fullmatch(item_id) or not _FILE.fullmatch(file):
        raise ValueError("an add needs an 'added/' content id and a file in images/")
    return Entry(op, item_id, label, file, tuple(float(v) for v in vector), space)


def membership(artifact_root: Path) -> tuple[dict[str, Entry], set[str]]:
    """The log folded: (added images still there, by id; ids deleted last), for batch-train."""
    added: dict[str, Entry] = {}
    deleted: set[str] = set()
    for entry in LiveLog(artifact_root).read()[0]:
        if entry.op == "add":
            added[entry.id] = entry
            deleted.discard(entry.id)
        else:
            added.pop(entry.id, None)
            deleted.add(entry.id)
    return added, deleted


@dataclass(frozen=True)
class _Delta:
    """One immutable state of the live changes: readers take it whole, writers replace it."""

    items: tuple[Item, ...]
    vectors: np.ndarray
    rows: dict[str, int]
    deleted: frozenset[str]


class LiveImages:
    """An artifact's image index (or one shard of it) with the live log applied on top.

    Added images live in a small exact delta searched beside ScaNN; deleted ones are left out of
    every answer. Readers see immutable snapshots, so searches never take the lock.
    """

    def __init__(self, base, artifact_root: Path, space: str, shard: tuple[int, int] | None = None):
        self.base = base
        self.name = base.name
        self.config = base.config
        self.space = space
        self.shard = shard
        self.log = LiveLog(artifact_root)
        self._lock = threading.Lock()
        self._offset = 0
        self._delta = _Delta((), np.zeros((0, base.dimension), dtype=np.float32), {}, frozenset())
        self.pending: set[str] = set()  # added in another word space: searchable after the next batch-train
        self.refresh()

    @property
    def dimension(self) -> int:
        return self.base.dimension

    def __len__(self) -> int:
        delta = self._delta
        return len(self.base) - sum(self._in_base(i) for i in delta.deleted) + len(delta.items)

    def _in_base(self, item_id: str) -> bool:
        try:
            self.base.vector_of(item_id)
            return True
        except UnknownId:
            return False

    def contains(self, item_id: str) -> bool:
        delta = self._delta
        return item_id not in delta.deleted and (item_id in delta.rows or self._in_base(item_id))

    def refresh(self) -> int:
        """Apply what the log gained since the last call; returns how many entries that was."""
        with self._lock:
            entries, offset = self.log.read(self._offset)
            mine = [e for e in entries if self.shard is None or shard_of(e.id, self.shard[1]) == self.shard[0]]
            if mine:
                self._apply(mine)
            self._offset = offset  # only once applied: a failure re-reads the same entries next time
            return len(mine)

    def _apply(self, entries: list[Entry]) -> None:
        delta = self._delta
        added = {item.id: (item, delta.vectors[row]) for row, item in enumerate(delta.items)}
        deleted = set(delta.deleted)
        for entry in entries:
            if entry.op == "delete":
                added.pop(entry.id, None)
                self.pending.discard(entry.id)
                if self._in_base(entry.id):  # only the artifact's own images need hiding
                    deleted.add(entry.id)
                continue
            deleted.discard(entry.id)
            if self._in_base(entry.id):
                continue  # the artifact already holds it, embedded by its own model
            if entry.space != self.space or len(entry.vector) != self.dimension:
                self.pending.add(entry.id)
                continue
            path = str(self.log.directory / entry.file)
            added[entry.id] = (Item(entry.id, path, entry.label), np.asarray(entry.vector, dtype=np.float32))
        items = tuple(item for item, _ in added.values())
        vectors = (np.stack([vector for _, vector in added.values()]) if added
                   else np.zeros((0, self.dimension), dtype=np.float32))
        self._delta = _Delta(items, vectors, {item.id: row for row, item in enumerate(items)}, frozenset(deleted))
        if self.pending:
            log.warning("%d added images were embedded in another word space than %s; "
                        "they become searchable after the next batch-train", len(self.pending), self.space)

    def add(self, images: list[tuple[str, bytes, list[float], str | None]]) -> list[str]:
        """(id, bytes, vector, label) each: checked, stored, logged durably, applied; returns the ids."""
        for item_id, data, vector, label in images:
            check_new_image(item_id, data, vector, self.dimension, label)
            self._check_shard(item_id)
        entries = [Entry("add", item_id, label, self.log.store_image(data),
                         tuple(float(v) for v in unit_query(vector, self.dimension)), self.space)
                   for item_id, data, vector, label in images]
        self.log.append(entries)
        self.refresh()
        return [entry.id for entry in entries]

    def delete(self, ids: list[str]) -> int:
        """Delete every id, or none: UnknownId names those not in the index."""
        unknown = [item_id for item_id in ids if not self.contains(item_id)]
        if unknown:
            raise UnknownId(f"no image {listed(unknown, 5)} in index {self.name!r}; nothing deleted")
        for item_id in ids:
            self._check_shard(item_id)
        self.log.append([Entry("delete", item_id) for item_id in dict.fromkeys(ids)])
        self.refresh()
        return len(set(ids))

    def _check_shard(self, item_id: str) -> None:
        if self.shard is not None and shard_of(item_id, self.shard[1]) != self.shard[0]:
            raise InvalidQuery(f"image {quoted(item_id)} belongs to shard {shard_of(item_id, self.shard[1])} "
                               f"of {self.shard[1]}, not to this one ({self.shard[0]})")

    def vector_of(self, item_id: str) -> np.ndarray:
        delta = self._delta
        if item_id in delta.deleted:
            raise UnknownId(f"no item {quoted(item_id)} in index {self.name!r} (it was deleted)")
        if item_id in delta.rows:
            return delta.vectors[delta.rows[item_id]]
        return self.base.vector_of(item_id)

    def search(self, query, k: int, min_score: float | None = None, exclude: Collection[str] = ()) -> list[Hit]:
        check_k(k)
        check_min_score(min_score)
        delta = self._delta
        hidden = _Either(delta.deleted, exclude) if exclude else delta.deleted  # no per-query copy of the deletes
        base_hits = self.base.search(query, k, min_score, hidden)
        if not delta.items:
            return base_hits
        scores = delta.vectors @ unit_query(query, self.dimension)
        delta_hits = [Hit(delta.items[row], float(scores[row])) for row in np.argsort(-scores)
                      if delta.items[row].id not in hidden and (min_score is None or scores[row] >= min_score)]
        return merge([base_hits, delta_hits[:k]], k)


class _Either:
    """Membership in either of two collections, without building their union."""

    def __init__(self, first: Collection[str], second: Collection[str]):
        self.first, self.second = first, second

    def __contains__(self, item: object) -> bool:
        return item in self.first or item in self.second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)


def space_of(manifest: dict) -> str:
    """The word space an artifact's vectors live in; vectors from the same space can be mixed."""
    return f"{manifest['word_vectors']['source']}:{manifest['dimension']}"


def check_new_image(item_id: str, data: bytes, vector, dimension: int, label: str | None = None) -> None:
    """InvalidQuery unless the id is the bytes' content id, the vector a finite one of the index's
    dimension and the label (if any) at most MAX_LABEL_CHARS long."""
    if label is not None and len(label) > MAX_LABEL_CHARS:
        raise InvalidQuery(f"a label is {len(label)} characters; the limit is {MAX_LABEL_CHARS}")
    if not data:
        raise InvalidQuery("an added image needs its bytes")
    if not _ID.fullmatch(item_id) or item_id != image_id(data):
        raise InvalidQuery(f"id {quoted(item_id)} is not the content id of the image bytes ({image_id(data)})")
    unit_query(vector, dimension)
