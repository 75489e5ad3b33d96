"""A small typed client for the Gateway service."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import security
from services.common.image_terms import DEFAULT_IMAGE_WEIGHT
from services.common.server import MAX_MESSAGE_BYTES

DEFAULT_ADDRESS = "127.0.0.1:50050"


@dataclass(frozen=True)
class Share:
    term: str  # `dog`, `golf ball`, `img:beach/0001.jpg`, `image`
    weight: float
    share: float  # of the score: the shares of a result add up to its score


@dataclass(frozen=True)
class Explanation:
    shares: list[Share]
    words: list["WordHit"]  # the image's 5 nearest words: its own top tags
    classes: list["WordHit"]  # its 3 nearest ImageNet classes (conse, hybrid, gated; none in devise)


@dataclass(frozen=True)
class ImageHit:
    id: str
    path: str
    label: str | None
    score: float
    explanation: Explanation | None = None  # when the search asked to explain


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


def _explanation(result: gateway_pb2.ImageResult) -> Explanation | None:
    if not result.HasField("explanation"):
        return None
    e = result.explanation
    return Explanation([Share(s.term, s.weight, s.share) for s in e.shares], [WordHit(w.word, w.score) for w in e.words],
                       [WordHit(c.name, c.score) for c in e.classes])


def _image_hits(response: gateway_pb2.ImageResults) -> Page:
    page = Page(_image_hit(r) for r in response.results)
    page.next_page_token = response.next_page_token
    return page


def _image_hit(r: gateway_pb2.ImageResult) -> ImageHit:
    return ImageHit(r.id, r.path, r.label if r.HasField("label") else None, r.score, _explanation(r))


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
            # a long-lived client (the web service, the folder watcher) finds a restarted gateway within
            # 2 s, not after gRPC's default back-off of up to 2 minutes
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ])
        self.stub = gateway_pb2_grpc.GatewayStub(security.with_token(self.channel, token))

    def search(self, text: str | None = None, *, image: bytes | None = None, k: int = 10,
               min_score: float | None = None, labels: list[str] = (), folder: str = "",
               page_token: str = "", after: str = "", before: str = "", like: list[bytes] = (),
               like_names: list[str] = (), like_ids: list[str] = (), like_weight: float = DEFAULT_IMAGE_WEIGHT,
               explain: bool = False) -> Page:
        """Images for text (`dog + img:beach/0001.jpg - fruit`) or an image, plus images `like` (bytes, named
        `like_names` in explanations) and `like_ids` (indexed ids), each weighing `like_weight`; only `labels`
        (any of them) under `folder`, taken at or `after` and `before` (ISO dates) when given; `page_token`:
        the previous page's `next_page_token`; `explain`: each hit's explanation."""
        if text is not None and image is not None:
            raise ValueError("search takes text or image bytes, not both (add images with like=)")
        names = list(like_names) + [""] * (len(like) - len(like_names))
        terms = [gateway_pb2.QueryTerm(image=data, weight=like_weight, name=name) for data, name in zip(like, names)]
        terms += [gateway_pb2.QueryTerm(image_id=item, weight=like_weight) for item in like_ids]
        if text is None and image is None and not terms:
            raise ValueError("search takes text, image bytes or images to be like")
        request = gateway_pb2.SearchRequest(text=text, image=image, k=k, min_score=min_score, labels=labels,
                                            folder=folder, page_token=page_token, after=after, before=before,
                                            terms=terms, explain=explain)
        return _image_hits(self.stub.Search(request, timeout=self.timeout))

    def similar(self, image: bytes | None = None, *, id: str | None = None, k: int = 10,
                min_score: float | None = None, labels: list[str] = (), folder: str = "",
                page_token: str = "", after: str = "", before: str = "", explain: bool = False) -> Page:
        if (id is None) == (image is None):
            raise ValueError("similar takes image bytes or an image id, not both")
        request = gateway_pb2.SimilarImagesRequest(image=image, id=id, k=k, min_score=min_score, labels=labels,
                                                   folder=folder, page_token=page_token, after=after, before=before,
                                                   explain=explain)
        return _image_hits(self.stub.SimilarImages(request, timeout=self.timeout))

    def tag(self, image: bytes, k: int = 5, mode: str = "") -> list[WordHit]:
        """The nearest words; `mode`: devise, conse, hybrid or gated ("" for the artifact's default)."""
        return _word_hits(self.stub.Tag(gateway_pb2.TagRequest(image=image, k=k, mode=mode), timeout=self.timeout))

    def words(self, word: str, k: int = 10) -> list[WordHit]:
        return _word_hits(self.stub.SimilarWords(gateway_pb2.SimilarWordsRequest(word=word, k=k), timeout=self.timeout))

    def add_images(self, images: list[bytes], labels: list[str | None] | None = None,
                   ids: list[str] | None = None) -> list[str]:
        """Add images (with optional labels) to the collection; returns their ids, in order. `ids`: the ids
        to give them (relative paths, `dog/0001.jpg`; one that the index holds is replaced), else content ids."""
        labels = labels or [None] * len(images)
        ids = ids or [""] * len(images)
        request = gateway_pb2.AddImagesRequest(images=[
            gateway_pb2.ImageToAdd(image=image, label=label, id=item_id)
            for image, label, item_id in zip(images, labels, ids, strict=True)])
        return list(self.stub.AddImages(request, timeout=self.timeout).ids)

    def delete_images(self, ids: list[str]) -> int:
        """Remove images by id; NOT_FOUND (and nothing removed) when any id is unknown."""
        return self.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=ids), timeout=self.timeout).deleted

    def image(self, id: str) -> ImageHit:
        """One indexed image by id (score 0): where its file is and its label."""
        r = self.stub.GetImage(gateway_pb2.GetImageRequest(id=id), timeout=self.timeout)
        return _image_hit(r)

    def list_images(self, folder: str = "", after_id: str = "", limit: int = 1000) -> tuple[list[ImageHit], str]:
        """One page of the indexed images under `folder`, sorted by id, and the after_id of the next page
        ("" after the last)."""
        response = self.stub.ListImages(gateway_pb2.ListImagesRequest(folder=folder, after_id=after_id, limit=limit),
                                        timeout=self.timeout)
        return [_image_hit(r) for r in response.images], response.next_after_id

    def all_images(self, folder: str = "") -> Iterator[ImageHit]:
        """Every indexed image under `folder`, by id, a page at a time."""
        after = ""
        while True:
            page, after = self.list_images(folder, after)
            yield from page
            if not after:
                return

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
