"""Image terms in the query language: `dog + img:beach/0001.jpg - fruit`.

- `img:ID` is the indexed image ID, of weight DEFAULT_IMAGE_WEIGHT: the ID runs to the next whitespace, so it may hold `:`,
  `+` and `-` (`img:2024-06/a:b.jpg`); `-img:ID` subtracts it, `+img:ID` adds it.
- `img:"ID"` quotes the ID (any characters but `"`, spaces too), and only a quoted ID takes a weight:
  `img:"beach/0001.jpg":2`. So `img:a.jpg:2` is the image `a.jpg:2`, never `a.jpg` weighted 2.
- `img:` always starts an image term where a term may start (at the start, after whitespace, `+` or
  `-`); the word `img` itself cannot be asked for.

The gateway takes the image terms out of a query (`split`) and sends the words that are left to the
encoder; the encoder refuses text that still holds one (`find`), since only the gateway can resolve ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from services.common.errors import quoted

PREFIX = "img:"
# An image term's weight when none is given (a word's is 1). Chosen on validation (batch/evaluate_mixed.py):
# on the validation half of ../shared/data/imagenet200's categories, `img:<a photo of L> + L` finds L's other
# photos best at image weight 0.4 (mixed mAP 0.867; 0.866 at 0.5; 0.853 at 1; the word alone 0.852), with the
# default artifact (CIFAR-10 head, Lite2, gated mode); of the weights within 0.005 of the best, the one giving the
# photo the most say (with Lite0 the same rule gave 0.5 too).
DEFAULT_IMAGE_WEIGHT = 0.5
# a term start: a sign (taken with the term), or start / whitespace / a sign just before `img:`
_START = r"(?:([+-])\s*|(?<![^\s+\-]))"
_QUOTED = r'"([^"]*)"(?::([0-9]*\.?[0-9]+))?(?=[\s+\-]|$)'
_BARE = r'([^\s"]\S*)'
_IMAGE_TERM = re.compile(_START + re.escape(PREFIX) + f"(?:{_QUOTED}|{_BARE})?")


class ImageTermError(ValueError):
    """A malformed image term; the message names it."""


@dataclass(frozen=True)
class ImageRef:
    id: str
    weight: float

    @property
    def name(self) -> str:
        """How the term reads in the query language."""
        return PREFIX + self.id if '"' not in self.id and not re.search(r"\s", self.id) else f'{PREFIX}"{self.id}"'


def _ref(match: re.Match) -> ImageRef:
    sign, quoted_id, weight, bare_id = match.groups()
    image = quoted_id if quoted_id is not None else bare_id
    if image is None:
        rest = match.string[match.end():match.end() + 40].split()
        raise ImageTermError(f"cannot parse the image term {quoted(PREFIX + (rest[0] if rest else ''))}: write "
                             'img:ID, or img:"ID":WEIGHT for a weight')
    if not image:
        raise ImageTermError("an image term needs an id: img:ID")
    value = float(weight) if weight is not None else DEFAULT_IMAGE_WEIGHT
    if not math.isfinite(value):
        raise ImageTermError(f"weight of {quoted(PREFIX + image)} is not a finite number")
    return ImageRef(image, -value if sign == "-" else value)


def split(text: str) -> tuple[str, list[ImageRef]]:
    """(the text without its image terms, the image terms in order); ImageTermError for a malformed one."""
    refs: list[ImageRef] = []
    parts: list[str] = []
    position = 0
    for match in _IMAGE_TERM.finditer(text):
        refs.append(_ref(match))
        parts.append(text[position:match.start()])
        position = match.end()
    parts.append(text[position:])
    return " ".join(parts), refs


def find(text: str) -> str | None:
    """The first image term of `text` as written, or None."""
    match = _IMAGE_TERM.search(text)
    return match.group(0).strip() if match else None
