"""A small typed client for the Gateway service."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import security
from services.common.server import MAX_MESSAGE_BYTES

DEFAULT_ADDRESS = "127.0.0.1:50050"


@dataclass(frozen=True)
class ImageHit:
    id: str
    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class WordHit:
    word: str
    score: float


@dataclass(frozen=True)
class Duplicates:
    """Groups of near-identical images, largest first; in each, the most central image first and every
    hit's score its similarity to that one."""

    groups: list[list[ImageHit]]
    threshold: float  # the one used (the gateway's default when none was asked for)
    images: int  # images compared
    without_features: int  # images left out: added live without backbone features
    total_groups: int  # groups found (more than `groups` when max_groups cut them)


class Page(list):
    """Image hits, best first, and the token of the page after them ("" after the last page)."""

    next_page_token: str = ""


def _image_hits(response: gateway_pb2.ImageResults) -> Page:
    page = Page(ImageHit(r.id, r.path, r.label if r.HasField("label") else None, r.score) for r in response.results)
    page.next_page_token = response.next_page_token
    return page


def _image_hit(r: gateway_pb2.ImageResult) -> ImageHit:
    return ImageHit(r.id, r.path, r.label if r.HasField("label") else None, r.score)


def _word_hits(response: gateway_pb2.WordResults) -> list[WordHit]:
    return [WordHit(w.word, w.score) for w in response.words]


class Client:
    """`Client(address).search("cat sofa", k=10)`; raises grpc.RpcError with the server's status.

    `tls` (e.g. `ClientTls.from_files(ca="ca.pem")`) makes it a TLS channel; `token` is sent as
    `authorization: Bearer <token>` on every call.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 30.0, *,
                 tls: security.ClientTls | None = None, token: str | None = None):
        self.timeout = timeout
        self.channel = security.channel(address, tls, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.stub = gateway_pb2_grpc.GatewayStub(security.with_token(self.channel, token))

    def search(self, text: str | None = None, *, image: bytes | None = None, k: int = 10,
               min_score: float | None = None, labels: list[str] = (), folder: str = "",
               page_token: str = "", after: str = "", before: str = "") -> Page:
        """Images for text or an image; only `labels` (any of them) under `folder`, taken at or `after`
        and `before` (ISO dates) when given; `page_token`: the previous page's `next_page_token`."""
        if (text is None) == (image is None):
            raise ValueError("search takes text or image bytes, not both")
        request = gateway_pb2.SearchRequest(text=text, image=image, k=k, min_score=min_score, labels=labels,
                                            folder=folder, page_token=page_token, after=after, before=before)
        return _image_hits(self.stub.Search(request, timeout=self.timeout))

    def similar(self, image: bytes | None = None, *, id: str | None = None, k: int = 10,
                min_score: float | None = None, labels: list[str] = (), folder: str = "",
                page_token: str = "", after: str = "", before: str = "") -> Page:
        if (id is None) == (image is None):
            raise ValueError("similar takes image bytes or an image id, not both")
        request = gateway_pb2.SimilarImagesRequest(image=image, id=id, k=k, min_score=min_score, labels=labels,
                                                   folder=folder, page_token=page_token, after=after, before=before)
        return _image_hits(self.stub.SimilarImages(request, timeout=self.timeout))

    def tag(self, image: bytes, k: int = 5, mode: str = "") -> list[WordHit]:
        """The nearest words; `mode`: devise, conse, hybrid or gated ("" for the artifact's default)."""
        return _word_hits(self.stub.Tag(gateway_pb2.TagRequest(image=image, k=k, mode=mode), timeout=self.timeout))

    def words(self, word: str, k: int = 10) -> list[WordHit]:
        return _word_hits(self.stub.SimilarWords(gateway_pb2.SimilarWordsRequest(word=word, k=k), timeout=self.timeout))

    def add_images(self, images: list[bytes], labels: list[str | None] | None = None) -> list[str]:
        """Add images (with optional labels) to the collection; returns their ids, in order."""
        labels = labels or [None] * len(images)
        request = gateway_pb2.AddImagesRequest(images=[gateway_pb2.ImageToAdd(image=image, label=label)
                                                       for image, label in zip(images, labels, strict=True)])
        return list(self.stub.AddImages(request, timeout=self.timeout).ids)

    def delete_images(self, ids: list[str]) -> int:
        """Remove images by id; NOT_FOUND (and nothing removed) when any id is unknown."""
        return self.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=ids), timeout=self.timeout).deleted

    def image(self, id: str) -> ImageHit:
        """One indexed image by id (score 0): where its file is and its label."""
        r = self.stub.GetImage(gateway_pb2.GetImageRequest(id=id), timeout=self.timeout)
        return ImageHit(r.id, r.path, r.label if r.HasField("label") else None, r.score)

    def duplicates(self, threshold: float | None = None, folder: str = "", max_groups: int = 0) -> Duplicates:
        """Groups of near-duplicate images (backbone features at least `threshold` similar; None: the
        gateway's default), only ids under `folder` when given; at most `max_groups` groups (0: all)."""
        response = self.stub.FindDuplicates(gateway_pb2.FindDuplicatesRequest(
            threshold=threshold, folder=folder, max_groups=max_groups), timeout=self.timeout)
        return Duplicates([[_image_hit(r) for r in group.images] for group in response.groups],
                          round(response.threshold, 6), response.images, response.without_features, response.total_groups)

    def with_token(self, token: str | None) -> "Client":
        """A client on this one's channel (no new connection) that sends `token` instead; close only this one."""
        other = copy.copy(self)
        other.stub = gateway_pb2_grpc.GatewayStub(security.with_token(self.channel, token))
        return other

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
