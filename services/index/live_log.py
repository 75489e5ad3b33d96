"""The live-update log of an artifact root and the image bytes it names; pure file work, no index.

    ARTIFACTS/live/images.log     one JSON line per add or delete, fsynced before the call returns
                                  (an add's backbone features, when given: base64 of float16 values)
    ARTIFACTS/live/images/<hex>   the bytes of each added image, named by their sha256

Every write (image bytes, log lines, removals, compaction) happens under one exclusive flock on
`images.log.lock`, so replicas sharing the folder never interleave, and none appends to a log that
a compaction has replaced. Compaction rewrites the log as the
last operation on each id (what replaying it gives is unchanged) and removes stored bytes that no
remaining add names; a reader that sees a new log (another inode) reads it again from the start.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from services.common import artifact
from services.common.ids import is_image_id, path_id_problem, stored_name

log = logging.getLogger(__name__)

LIVE_DIR = "live"
LOG_NAME = "images.log"
LOCK_NAME = "images.log.lock"
IMAGES_DIR = "images"
GC_AGE_SECONDS = 3600.0  # unreferenced bytes younger than this may belong to a writer outside the lock
_FILE = re.compile(IMAGES_DIR + r"/[0-9a-f]{64}")


def image_file(data: bytes, item_id: str | None = None) -> str:
    """Where the bytes are stored, relative to the live folder: named by a hash, never by a request.
    A content id's bytes by their sha256; a given id's by services.common.ids.stored_name (each id its
    own copy, so deleting one id never takes the bytes another id still names)."""
    if item_id is None or is_image_id(item_id):
        return f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}"
    return f"{IMAGES_DIR}/{stored_name(item_id, data)}"


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
    features: bytes = b""  # the image's unit backbone features, float16 little-endian; empty: none given
    backbone: str = ""  # the backbone that made them: artifact.Backbone.identity


@dataclass(frozen=True)
class Read:
    entries: list[Entry]
    inode: int  # which log file (a compaction makes a new one)
    offset: int  # after the last complete line
    restarted: bool  # the log was replaced since the given inode: `entries` are all of it


class LiveLog:
    """The log and the stored image bytes of one artifact root; writes are durable when they return."""

    def __init__(self, artifact_root: Path):
        self.directory = live_dir(artifact_root)
        self.path = self.directory / LOG_NAME

    @contextmanager
    def _locked(self) -> Iterator:
        """The log, open for appending, under the exclusive lock. The lock is a file of its own,
        which a compaction (replacing the log) never replaces."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOCK_NAME, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                created = not self.path.exists()
                with open(self.path, "a+b") as handle:
                    if created:
                        artifact.fsync(self.directory)
                    yield handle
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _store(self, data: bytes, name: str | None = None) -> str:
        name = name or image_file(data)
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

    def store_image(self, data: bytes) -> str:
        """Store the bytes on their own (under the lock); returns the relative file name."""
        with self._locked():
            return self._store(data)

    def append(self, entries: list[Entry], images: Sequence[bytes] = (), remove: Sequence[str] = ()) -> None:
        """Under the lock: store `images` (the bytes of the add entries, in order, each under its entry's
        file), append whole lines in one write and fsync, then remove the stored files `remove` (the
        bytes of images these entries delete or replace)."""
        data = "".join(json.dumps(_entry_dict(e), ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
        with self._locked() as handle:
            files = [e.file for e in entries if e.op == "add"]
            for number, image in enumerate(images):
                self._store(image, files[number] if number < len(files) else None)
            if _ends_torn(handle):  # a write that crashed half-way: end its line, never extend it
                data = b"\n" + data
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            self._remove(remove)

    def _remove(self, names: Sequence[str]) -> None:
        for name in names:
            if _FILE.fullmatch(name):
                (self.directory / name).unlink(missing_ok=True)

    def read(self, offset: int = 0) -> tuple[list[Entry], int]:
        """Complete lines from byte `offset`: (entries, offset after the last complete line)."""
        got = self.read_from(None, offset)
        return got.entries, got.offset

    def read_from(self, inode: int | None, offset: int) -> Read:
        """Complete lines of the log from `offset`, or from its start if it is no longer file `inode`.

        A last line without its newline is a write that never returned (a crash mid-append): it is
        left for later, never half-applied. Lines that are not entries are skipped with a warning.
        """
        try:
            with open(self.path, "rb") as handle:
                current = os.fstat(handle.fileno()).st_ino
                restarted = inode is not None and current != inode
                if restarted:
                    offset = 0
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return Read([], inode or 0, offset, False)
        end = data.rfind(b"\n") + 1
        entries = []
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                entries.append(_entry_of(json.loads(line)))
            except ValueError as error:  # one bad line must not stop every replica from starting
                log.warning("%s: skipping a line that is not a log entry (%s): %.80r", self.path, error, line)
        return Read(entries, current, offset + end, restarted)

    def compact(self, gc_age_seconds: float = GC_AGE_SECONDS) -> tuple[int, int]:
        """Rewrite the log as the last operation on each id; remove stored bytes no add names.
        Returns (lines before, lines after)."""
        with self._locked():
            entries = self.read()[0]
            last: dict[str, Entry] = {}
            for entry in entries:
                last.pop(entry.id, None)  # re-inserted: the order of last operations is kept
                last[entry.id] = entry
            temporary = self.path.with_name(f".{LOG_NAME}.{os.getpid()}-{threading.get_ident()}.compact")
            with open(temporary, "wb") as handle:
                handle.write("".join(json.dumps(_entry_dict(e), ensure_ascii=False) + "\n"
                                     for e in last.values()).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            artifact.fsync(self.directory)
            named = {e.file for e in last.values() if e.op == "add"}
            cutoff = time.time() - gc_age_seconds
            stored = self.directory / IMAGES_DIR
            unused = [f"{IMAGES_DIR}/{p.name}" for p in (stored.iterdir() if stored.is_dir() else ())
                      if f"{IMAGES_DIR}/{p.name}" not in named and p.stat().st_mtime <= cutoff]
            self._remove(unused)
        log.info("%s compacted: %d lines -> %d; %d unused image files removed", self.path, len(entries),
                 len(last), len(unused))
        return len(entries), len(last)


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
        if entry.features:
            data.update(features=base64.b64encode(entry.features).decode("ascii"), backbone=entry.backbone)
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
    if not (is_image_id(item_id) or path_id_problem(item_id) is None) or not _FILE.fullmatch(file):
        raise ValueError("an add needs an 'added/' content id or a relative path, and a file in images/")
    return Entry(op, item_id, label, file, tuple(float(v) for v in vector), space, *_features_of(data))


def _features_of(data: dict) -> tuple[bytes, str]:
    """An add's optional features and their backbone; ValueError when present but malformed."""
    if "features" not in data:
        return b"", ""
    encoded, backbone = data["features"], data.get("backbone")
    try:
        features = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
    except binascii.Error:
        features = None
    if not features or len(features) % 2 or not isinstance(backbone, str):
        raise ValueError("an add's 'features' must be base64 of float16 values, with a string 'backbone'")
    return features, backbone


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
