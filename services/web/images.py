"""Image files of indexed images: their media type, and small JPEG thumbnails made once and cached."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

THUMBNAIL_PIXELS = 256


class Unreadable(Exception):
    """The index holds the image, but its file cannot be read here."""


def media_type(path: str) -> str:
    """The file's media type from its content (added images are stored without an extension)."""
    try:
        with Image.open(path) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (OSError, UnidentifiedImageError) as error:
        raise Unreadable(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def thumbnail(path: str, cache: Path) -> Path:
    """A JPEG at most THUMBNAIL_PIXELS on a side, made on first use and kept in `cache`.

    It is keyed by the file's path, size and modification time, so a changed file gets a new one.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise Unreadable(f"cannot read {path}: {error.strerror}") from None
    key = hashlib.sha256(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache / f"{key}.jpg"
    if target.is_file():
        return target
    try:
        with Image.open(path) as image:
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    except (OSError, UnidentifiedImageError) as error:
        raise Unreadable(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    cache.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(handle, "wb") as out:
        small.save(out, "JPEG", quality=85)
    os.replace(temporary, target)  # atomic: concurrent requests never see half a file
    return target
