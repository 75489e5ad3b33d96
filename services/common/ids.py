"""Content ids of images added while serving: the gateway makes them, the index checks them."""

from __future__ import annotations

import hashlib
import re

ID_PREFIX = "added/"
_CONTENT_ID = re.compile(r"added/[0-9a-f]{24}")


def image_id(data: bytes) -> str:
    """The id of an added image: its content hash, so adding the same bytes twice is harmless."""
    return ID_PREFIX + hashlib.sha256(data).hexdigest()[:24]


def is_image_id(item_id: str) -> bool:
    """Whether `item_id` has the form of an added image's content id."""
    return _CONTENT_ID.fullmatch(item_id) is not None
