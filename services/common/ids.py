"""Ids of images added while serving: content ids the gateway makes, or paths a caller gives (a watched
folder's files, named as `make index` names them); the index checks both."""

from __future__ import annotations

import hashlib
import re

ID_PREFIX = "added/"
MAX_PATH_ID_CHARS = 1000
_CONTENT_ID = re.compile(r"added/[0-9a-f]{24}")
_STORED_COPY = re.compile(r"(?:.*/)?live/images/([0-9a-f]{64})")


def image_id(data: bytes) -> str:
    """The id of an added image: its content hash, so adding the same bytes twice is harmless."""
    return ID_PREFIX + hashlib.sha256(data).hexdigest()[:24]


def is_image_id(item_id: str) -> bool:
    """Whether `item_id` has the form of an added image's content id."""
    return _CONTENT_ID.fullmatch(item_id) is not None


def path_id_problem(item_id: str) -> str | None:
    """Why `item_id` cannot be a given id (a relative path with '/' separators, `dog/0001.jpg`), or None."""
    if not item_id:
        return "a given id must not be empty"
    if len(item_id) > MAX_PATH_ID_CHARS:
        return f"a given id has at most {MAX_PATH_ID_CHARS} characters (got {len(item_id)})"
    if item_id.startswith(ID_PREFIX):
        return f"ids under {ID_PREFIX!r} are content ids, made by the gateway"
    if any(ord(c) < 32 or c == "\\" for c in item_id):
        return "a given id holds no control characters or backslashes"
    if any(part in ("", ".", "..") for part in item_id.split("/")):
        return "a given id is a relative path: no leading or doubled '/', no '.' or '..' parts"
    return None


def stored_name(item_id: str, data: bytes) -> str:
    """The name of the stored copy of an image added under a given id: a hash of the id and the bytes, so
    the copy changes exactly when the file's content does, and no two ids share one."""
    return hashlib.sha256(item_id.encode("utf-8") + b"\0" + data).hexdigest()


def stored_copy_name(path: str) -> str | None:
    """The name of an added image's stored copy when that is its indexed path (`ARTIFACTS/live/images/<hash>`),
    else None (an image indexed where it lies)."""
    match = _STORED_COPY.fullmatch(path)
    return match.group(1) if match else None
