"""What one request may ask for, checked alike by every service that receives it.

Each check returns None for an acceptable value, else the message; the caller raises or aborts
with its own error type.
"""

from __future__ import annotations

MAX_K = 1000  # results per search
MAX_IMAGES = 64  # images per call (encode, add)
MAX_LABEL_CHARS = 100  # label of an added image
MAX_IMAGE_TERMS = 8  # image terms (ids and bytes) in one Search
MAX_LIST = 1000  # items per listing page


def limit_problem(limit: int) -> str | None:
    return None if 1 <= limit <= MAX_LIST else f"limit must be between 1 and {MAX_LIST}; got {limit}"


def k_problem(k: int) -> str | None:
    return None if 1 <= k <= MAX_K else f"k must be between 1 and {MAX_K}; got {k}"


def min_score_problem(min_score: float | None) -> str | None:
    """NaN is refused too: it fails the range comparison."""
    if min_score is None or -1.0 <= min_score <= 1.0:
        return None
    return f"min_score must be a number in [-1, 1]; got {min_score}"


def images_problem(count: int) -> str | None:
    return None if count <= MAX_IMAGES else f"{count} images in one call; the limit is {MAX_IMAGES}"


def label_problem(label: str | None) -> str | None:
    if label is None or len(label) <= MAX_LABEL_CHARS:
        return None
    return f"a label is {len(label)} characters; the limit is {MAX_LABEL_CHARS}"


def image_terms_problem(count: int) -> str | None:
    return None if count <= MAX_IMAGE_TERMS else f"{count} image terms in one query; the limit is {MAX_IMAGE_TERMS}"
