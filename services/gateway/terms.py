"""What a Search asks for, as weighted terms: at most one text (the query language, its `img:` terms taken
out) and up to 8 images, by id or as bytes. Pure: no downstream call here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common import bounds, image_terms


class BadTerms(ValueError):
    """A Search whose terms cannot make a query; the message says why."""


@dataclass(frozen=True)
class TextTerm:
    text: str  # words only: image terms already taken out
    weight: float


@dataclass(frozen=True)
class ImageTerm:
    name: str  # as explanations show it
    weight: float
    id: str | None = None  # an indexed image ...
    data: bytes | None = None  # ... or an image's bytes


@dataclass(frozen=True)
class Query:
    text: TextTerm | None = None
    images: list[ImageTerm] = field(default_factory=list)
    plain_text: str | None = None  # the request's `text` as sent, when it is the whole query (today's path)
    plain_image: bytes | None = None  # the request's `image`, when it is the whole query


def _weight(term, position: int) -> float:
    """The term's weight: as given, else a word's 1 for a text and image_terms.DEFAULT_IMAGE_WEIGHT for an image."""
    default = 1.0 if term.WhichOneof("term") == "text" else image_terms.DEFAULT_IMAGE_WEIGHT
    weight = term.weight if term.HasField("weight") else default
    if not math.isfinite(weight):
        raise BadTerms(f"term {position} has a weight that is not a finite number")
    return weight


def _text(text: str, weight: float) -> tuple[TextTerm | None, list[ImageTerm]]:
    try:
        words, refs = image_terms.split(text)
    except image_terms.ImageTermError as error:
        raise BadTerms(str(error)) from None
    if not words.strip() and not refs:
        raise BadTerms("the query text is empty")
    images = [ImageTerm(ref.name, weight * ref.weight, id=ref.id) for ref in refs]
    return (TextTerm(words, weight) if words.strip() else None), images


def _gathered(request) -> tuple[list[tuple[str, str, float, str]], bytes | None]:
    """(kind, value, weight, name) of every term in request order, the `query` oneof first; and its image."""
    which = request.WhichOneof("query")
    gathered = []
    if which == "text":
        gathered.append(("text", request.text, 1.0, ""))
    elif which == "image":
        gathered.append(("image", request.image, image_terms.DEFAULT_IMAGE_WEIGHT, ""))
    for position, term in enumerate(request.terms, 1):
        kind = term.WhichOneof("term")
        if kind is None:
            raise BadTerms(f"term {position} is empty: give it a text, an image_id or image bytes")
        value = getattr(term, kind)
        if not value:
            raise BadTerms(f"term {position} has an empty {kind}")
        gathered.append((kind, value, _weight(term, position), term.name))
    return gathered, request.image if which == "image" else None


def query_of(request) -> Query:
    """The terms of a SearchRequest; BadTerms for a malformed one, more than one text or over 8 images."""
    gathered, image = _gathered(request)
    if not gathered:
        raise BadTerms("Search needs a query: text, image bytes or terms")
    if not request.terms:  # the query oneof alone: today's paths, unless the text holds image terms
        kind, value, weight, _ = gathered[0]
        if kind == "image":
            return Query(images=[ImageTerm("image", weight, data=image)], plain_image=image)
        if image_terms.find(value) is None:
            return Query(TextTerm(value, weight), plain_text=value)
    text, images = None, []
    unnamed = sum(kind == "image" and not name for kind, _, _, name in gathered)
    for kind, value, weight, name in gathered:
        if kind == "text":
            if text is not None:
                raise BadTerms("a query takes one text; write all its words in it (cat:2 sofa -dog)")
            text, found = _text(value, weight)
            images += found
        elif kind == "image_id":
            images.append(ImageTerm(name or image_terms.ImageRef(value, weight).name, weight, id=value))
        else:
            number = sum(i.data is not None for i in images) + 1
            images.append(ImageTerm(name or ("image" if unnamed == 1 else f"image {number}"), weight, data=value))
    problem = bounds.image_terms_problem(len(images))
    if problem:
        raise BadTerms(problem)
    return Query(text, images)
