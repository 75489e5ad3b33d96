"""When a photo was taken: its EXIF DateTimeOriginal, else its file's modification time.

Times are seconds since 1970. EXIF times carry no zone and are read as UTC, as are the dates that
filters give (`2024-06-01`), so the two compare as written.
"""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, UnidentifiedImageError

EXIF_IFD = 0x8769
DATE_TIME_ORIGINAL = 36867
EXIF_FORMAT = "%Y:%m:%d %H:%M:%S"


def parse_time(text: str) -> float:
    """`2024-06-01` or `2024-06-01T12:30[:00]` (UTC unless it names a zone) -> seconds; ValueError otherwise."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def exif_time(image: Image.Image) -> float | None:
    try:
        text = image.getexif().get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL)
        return datetime.strptime(str(text).strip("\x00 "), EXIF_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except (ValueError, TypeError, OSError, SyntaxError):
        return None


def taken(path: str | Path, data: bytes | None = None) -> float | None:
    """The photo's EXIF DateTimeOriginal (reading `data` if given, else the file's header), else the
    file's modification time; None when the file cannot be read at all."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            found = exif_time(image)
    except (OSError, UnidentifiedImageError, ValueError):
        found = None
    if found is not None:
        return found
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
