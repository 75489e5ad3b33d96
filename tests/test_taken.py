"""When a photo was taken (EXIF DateTimeOriginal, else the file's time), stored with each indexed item,
and a time range applied inside the index: to the artifact's rows and to images added live."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from services.common.ids import image_id
from services.common.items import Item, read_items, write_items
from services.common.taken import DATE_TIME_ORIGINAL, EXIF_IFD, parse_time, taken
from services.index import live
from services.index.core import VectorIndex
from services.index.selection import Selection


def jpeg(original: str | None = None, colour=(200, 30, 30)) -> bytes:
    image = Image.new("RGB", (32, 32), colour)
    exif = Image.Exif()
    if original:
        exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = original
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    return out.getvalue()


def utc(*parts) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


def test_exif_time_first_then_the_file_time(tmp_path):
    with_exif, without = tmp_path / "a.jpg", tmp_path / "b.jpg"
    with_exif.write_bytes(jpeg("2024:06:01 18:30:00"))
    without.write_bytes(jpeg())
    os.utime(without, (utc(2019, 1, 2), utc(2019, 1, 2)))
    os.utime(with_exif, (utc(2019, 1, 2), utc(2019, 1, 2)))
    assert taken(with_exif) == utc(2024, 6, 1, 18, 30)
    assert taken(without) == utc(2019, 1, 2)
    broken = tmp_path / "c.jpg"
    broken.write_bytes(jpeg("not a date"))
    os.utime(broken, (utc(2020, 5, 5), utc(2020, 5, 5)))
    assert taken(broken) == utc(2020, 5, 5)
    assert taken(tmp_path / "missing.jpg") is None


def test_dates_as_users_write_them():
    assert parse_time("2024-06-01") == utc(2024, 6, 1)
    assert parse_time(" 2024-06-01T18:00 ") == utc(2024, 6, 1, 18)
    assert parse_time("2024-06-01T18:00+02:00") == utc(2024, 6, 1, 16)
    for bad in ("yesterday", "2024-13-01", "", "01/06/2024"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_items_keep_their_time_and_old_rows_read_without_one(tmp_path):
    items = [Item("a.jpg", "/x/a.jpg", "cat", 1717266600.0), Item("b.jpg", "/x/b.jpg")]
    write_items(tmp_path / "items.jsonl", items)
    assert read_items(tmp_path / "items.jsonl") == items
    assert '"taken"' not in (tmp_path / "items.jsonl").read_text().splitlines()[1]


def test_a_time_range_keeps_the_rows_taken_inside_it(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    days = [utc(2024, 1, 1) + 86400 * (row % 365) if row % 7 else None for row in range(3000)]
    index = VectorIndex.build("images", vectors, [Item(f"{row}.jpg", taken=day) for row, day in enumerate(days)])
    june = Selection(since=parse_time("2024-06-01"), until=parse_time("2024-07-01"))
    inside = {f"{row}.jpg" for row, day in enumerate(days) if day is not None and june.since <= day < june.until}
    hits = index.search(vectors[0], 1000, selection=june)
    assert {h.item.id for h in hits} == inside and len(inside) > 200  # every one of them, none without a time
    scores = vectors[[int(i.split(".")[0]) for i in inside]] @ vectors[0]
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1], atol=1e-5)
    assert index.search(vectors[0], 10, selection=Selection(since=parse_time("2030-01-01"))) == []


def test_an_image_added_live_is_found_by_the_time_in_its_exif(tmp_path):
    vectors = np.eye(16, dtype=np.float32)
    base = VectorIndex.build("images", vectors[:8], [Item(f"{row}.jpg", taken=utc(2010, 1, 1)) for row in range(8)])
    images = live.LiveImages(base, tmp_path, "test:16")
    data = jpeg("2001:02:03 04:05:06")
    (added,) = images.add([(image_id(data), data, vectors[9], None)])
    that_day = Selection(since=parse_time("2001-02-03"), until=parse_time("2001-02-04"))
    assert [h.item.id for h in images.search(vectors[9], 10, selection=that_day)] == [added]
    assert added not in {h.item.id for h in images.search(vectors[9], 10, selection=Selection(since=utc(2005, 1, 1)))}
