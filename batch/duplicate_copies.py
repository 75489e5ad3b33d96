"""A near-duplicate benchmark: copies of real photos mixed into others, and pair precision/recall.

The collection is imagenet200's 1,000 real photos and 1,000 CIFAR-10 photos; for 200 of the real
photos (the first two of each category of one half, batch/open_vocab.py's fixed split: `validation`
chooses the default threshold, `test` is for the tests only) three copies are added:

- resized: both sides halved (Lanczos), saved as JPEG quality 90;
- recompressed: the same pixels saved again as JPEG quality 40;
- cropped: 90% of the width and of the height kept, at an offset drawn from `seed`, JPEG quality 90.

A source photo and its copies are a true group (4 images, 6 pairs). Precision and recall are over
unordered pairs of images: a pair is predicted when both images are in one returned group, and true
when both come from one source photo. A pair of collection photos that really are near-duplicates of
each other counts as a false positive.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from PIL import Image

from batch.images import ImageRecord
from batch.open_vocab import records as real_records

KINDS = ("resized", "recompressed", "cropped")
SOURCES_PER_CATEGORY = 2


@dataclass(frozen=True)
class Copy:
    record: ImageRecord
    source_id: str
    kind: str


def sources(real_photos: Path, half: str) -> list[ImageRecord]:
    """The first SOURCES_PER_CATEGORY photos (sorted by id) of each category of `half`."""
    kept, per_category = [], {}
    for record in sorted(real_records(real_photos, half), key=lambda r: r.id):
        per_category[record.label] = per_category.get(record.label, 0) + 1
        if per_category[record.label] <= SOURCES_PER_CATEGORY:
            kept.append(record)
    return kept


def copy_bytes(data: bytes, kind: str, rng: random.Random) -> bytes:
    """One transformed copy of an encoded photo, as JPEG bytes."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    quality = 90
    if kind == "resized":
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.LANCZOS)
    elif kind == "recompressed":
        quality = 40
    elif kind == "cropped":
        width, height = round(image.width * 0.9), round(image.height * 0.9)
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
        image = image.crop((left, top, left + width, top + height))
    else:
        raise ValueError(f"unknown kind of copy {kind!r}; one of {', '.join(KINDS)}")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def planned_copies(originals: list[ImageRecord], folder: Path) -> list[Copy]:
    """The copies `make_copies` writes, in its order: `folder/<label>/<stem>-<kind>.jpg`, with ids under
    `folder.name/`."""
    planned = []
    for original in originals:
        for kind in KINDS:
            relative = Path(original.label or "") / f"{Path(original.id).stem}-{kind}.jpg"
            planned.append(Copy(ImageRecord(f"{folder.name}/{relative.as_posix()}", str(folder / relative), original.label),
                                original.id, kind))
    return planned


def make_copies(originals: list[ImageRecord], folder: Path, seed: int = 0) -> list[Copy]:
    """Write every kind of copy of each original (planned_copies); the crops' offsets come from `seed`."""
    rng = random.Random(seed)
    made = planned_copies(originals, folder)
    paths = {original.id: original.path for original in originals}
    for copy in made:
        if copy.kind == KINDS[0]:  # the first copy of the next source
            data = Path(paths[copy.source_id]).read_bytes()
        path = Path(copy.record.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(copy_bytes(data, copy.kind, rng))
    return made


def true_pairs(copies: list[Copy]) -> set[frozenset[str]]:
    """Pairs of ids made from one source photo (the source's id and its copies' ids)."""
    groups: dict[str, set[str]] = {}
    for made in copies:
        groups.setdefault(made.source_id, {made.source_id}).add(made.record.id)
    return {frozenset(pair) for group in groups.values() for pair in combinations(sorted(group), 2)}


def predicted_pairs(groups: list[list[str]]) -> set[frozenset[str]]:
    return {frozenset(pair) for group in groups for pair in combinations(sorted(group), 2)}


def pair_scores(groups: list[list[str]], truth: set[frozenset[str]]) -> dict:
    """Pair precision and recall of `groups` (lists of ids) against the true pairs."""
    predicted = predicted_pairs(groups)
    right = len(predicted & truth)
    return {"precision": right / len(predicted) if predicted else 1.0, "recall": right / len(truth) if truth else 1.0,
            "predicted_pairs": len(predicted), "true_pairs": len(truth), "right_pairs": right, "groups": len(groups)}
