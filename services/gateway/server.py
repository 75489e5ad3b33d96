"""The Gateway gRPC service: composes Encoder and Index; every downstream call has a deadline."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Iterator

import grpc
import numpy as np

from semsearch.v1 import encoder_pb2, gateway_pb2, gateway_pb2_grpc, index_pb2
from services.common import bounds, mixing
from services.common import limits as limits_module
from services.common import metrics
from services.common import security
from services.common.limits import Limits
from services.common import server as common
from services.common.errors import quoted
from services.common.ids import image_id, path_id_problem
from services.gateway import duplicates, explain
from services.gateway.batching import DEFAULT_IN_FLIGHT as DEFAULT_SEARCH_CALLS
from services.gateway.downstream import Downstream, ImageFeatures, VersionMismatch
from services.gateway.paging import BadScope, Scope
from services.gateway.text_cache import DEFAULT_SIZE as DEFAULT_TEXT_CACHE, TextVectorCache
from services.gateway.terms import BadTerms, Query, query_of

log = logging.getLogger(__name__)

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
VERSION_ATTEMPTS = 3  # "" (current), then the version a refusal named, once more if a switch intervened
VERSION_RETRY_PAUSE = 0.1
DEFAULT_TIMEOUT = 10.0
HEALTH_POLL_SECONDS = 1.0


def _check_k(k: int, context) -> None:
    problem = bounds.k_problem(k)
    if problem:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


def _min_score(request, context) -> float | None:
    value = request.min_score if request.HasField("min_score") else None
    problem = bounds.min_score_problem(value)
    if problem:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    return value


def _scope(request, context) -> Scope:
    try:
        return Scope.of(request)
    except BadScope as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def _query(request, context) -> Query:
    try:
        return query_of(request)
    except BadTerms as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


@dataclass(frozen=True)
class Explained:
    """An index answer with an explanation per result."""

    response: index_pb2.IndexSearchResponse
    explanations: list[gateway_pb2.Explanation]


def _image_result(item, score: float = 0.0) -> gateway_pb2.ImageResult:
    """The gateway's answer for one index Item or Neighbor (both have id, path and an optional label)."""
    return gateway_pb2.ImageResult(id=item.id, path=item.path, label=item.label if item.HasField("label") else None,
                                   score=score)


def _image_results(response: index_pb2.IndexSearchResponse,
                   explanations: list[gateway_pb2.Explanation] | None = None) -> gateway_pb2.ImageResults:
    results = gateway_pb2.ImageResults(results=[_image_result(n, n.score) for n in response.neighbors])
    for result, explanation in zip(results.results, explanations or ()):
        result.explanation.CopyFrom(explanation)
    return results


def _ids_to_add(images, context) -> list[str]:
    """Each image's id: the one given (a relative path), else its content id."""
    for image in images:
        problem = image.id and path_id_problem(image.id)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"id {quoted(image.id)}: {problem}")
    return [image.id or image_id(image.image) for image in images]


def _duplicate_groups(found: ImageFeatures, groups: list[duplicates.Group], threshold: float,
                      max_groups: int) -> gateway_pb2.DuplicateGroups:
    shown = groups[:max_groups] if max_groups else groups
    return gateway_pb2.DuplicateGroups(
        groups=[gateway_pb2.DuplicateGroup(images=[_image_result(found.items[r], s) for r, s in zip(g.rows, g.scores)])
                for g in shown],
        threshold=threshold, images=len(found.items), without_features=found.without_features,
        total_groups=len(groups))


def _word_results(response: index_pb2.IndexSearchResponse) -> gateway_pb2.WordResults:
    return gateway_pb2.WordResults(words=[gateway_pb2.WordResult(word=n.id, score=n.score) for n in response.neighbors])


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Each answer comes from one artifact version: a query vector is searched only in an index of
    the version that made it (see `_on_one_version`)."""

    def __init__(self, downstream: Downstream, text_cache: TextVectorCache | None = None,
                 telemetry: metrics.Telemetry | None = None):
        self.downstream = downstream
        self.text_cache = text_cache if text_cache is not None else TextVectorCache(0)
        self.telemetry = telemetry
        self.duplicates_slot = threading.Semaphore(1)  # one near-duplicate search at a time: it is O(n^2)

    def Search(self, request, context):
        _check_k(request.k, context)
        min_score = _min_score(request, context)
        scope = _scope(request, context)
        query = _query(request, context)
        if query.plain_text is not None and not request.explain:
            def attempt(version: str):
                vector, version = self._text_vector(query.plain_text, version, context)
                return self._search("images", context, request.k, min_score, vector, version, scope)
        elif query.plain_image is not None and not request.explain:
            def attempt(version: str):
                return self._search_by_image("images", query.plain_image, version, context, request.k, min_score,
                                             scope=scope)
        else:
            def attempt(version: str):
                return self._mixed(query, version, context, request.k, min_score, scope, request.explain)
        return self._images_page(attempt, scope, request.k, context)

    def SimilarImages(self, request, context):
        _check_k(request.k, context)
        min_score = _min_score(request, context)
        scope = _scope(request, context)
        which = request.WhichOneof("query")
        if which == "image":
            def search(version: str):
                return self._search_by_image("images", request.image, version, context, request.k, min_score,
                                             scope=scope, with_vectors=request.explain)
        elif which == "id":
            def search(version: str):
                return self._similar_to_id(request.id, version, context, request.k, min_score, scope, request.explain)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SimilarImages needs image bytes or an image id")
        if not request.explain:
            return self._images_page(search, scope, request.k, context)
        name = "image" if which == "image" else f"img:{request.id}"

        def attempt(version: str):
            response = search(version)
            return Explained(response, self._explanations(explain.single_term_shares(name, response), response,
                                                          context))
        return self._images_page(attempt, scope, request.k, context)

    def _text_vector(self, text: str, version: str, context) -> tuple[Sequence[float], str]:
        """A text query's vector and its version: kept from an earlier query, else from the encoder."""
        kept = self.text_cache.get(text, version)
        if self.telemetry is not None and self.telemetry.metrics_on and self.text_cache.size:
            self.telemetry.text_cache.labels("hit" if kept is not None else "miss").inc()
        if kept is not None:
            return kept
        encoded = self.downstream.call("encoder", self.downstream.encoder.EncodeText,
                                       encoder_pb2.EncodeTextRequest(text=text, artifact_version=version), context)
        if not version:
            self.text_cache.current = encoded.artifact_version
        self.text_cache.put(text, encoded.artifact_version, encoded.vector.values)
        return encoded.vector.values, encoded.artifact_version

    def _images_page(self, attempt, scope: Scope, k: int, context) -> gateway_pb2.ImageResults:
        """A first page from whatever version encoder and index agree on; a next page from its token's."""
        if scope.page is None:
            response = self._on_one_version(attempt, context)
        else:
            try:
                response = attempt(scope.version)
            except VersionMismatch:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"page_token is for artifact version {scope.version}, which is no longer served; "
                              "search again for the first page")
        if isinstance(response, Explained):
            results = _image_results(response.response, response.explanations)
            response = response.response
        else:
            results = _image_results(response)
        results.next_page_token = scope.next_token(response, k)
        return results

    def Tag(self, request, context):
        _check_k(request.k, context)
        return _word_results(self._on_one_version(
            lambda version: self._search_by_image("words", request.image, version, context, request.k, None,
                                                  request.mode), context))

    def SimilarWords(self, request, context):
        _check_k(request.k, context)
        word = request.word.strip().lower()
        if not word:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SimilarWords needs a word")
        search = index_pb2.IndexSearchRequest(index="words", k=request.k, id=word, exclude_ids=[word])
        return _word_results(self.downstream.call("index", self.downstream.index.Search, search, context))

    def AddImages(self, request, context):
        if not request.images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "AddImages needs at least one image")
        problem = bounds.images_problem(len(request.images))
        if problem:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
        long = [bounds.label_problem(image.label) for image in request.images if image.HasField("label")]
        if any(long):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, next(p for p in long if p))
        ids = _ids_to_add(request.images, context)

        def attempt(version: str) -> None:
            encoded = self.downstream.call("encoder", self.downstream.encoder.EncodeImages, encoder_pb2.EncodeImagesRequest(
                images=[image.image for image in request.images], artifact_version=version, with_features=True), context)
            features = list(encoded.features) or [None] * len(ids)  # an older encoder gives none
            new = [index_pb2.NewImage(id=item_id, vector=index_pb2.FloatVector(values=vector.values), image=image.image,
                                      label=image.label if image.HasField("label") else None,
                                      features=index_pb2.FloatVector(values=feature.values) if feature else None)
                   for item_id, vector, feature, image in zip(ids, encoded.vectors, features, request.images)]
            for name, stub, positions in self.downstream.image_stubs(ids):
                self.downstream.call_named(name, stub.AddImages, index_pb2.IndexAddImagesRequest(
                    images=[new[p] for p in positions], artifact_version=encoded.artifact_version), context)

        self._on_one_version(attempt, context)
        return gateway_pb2.AddImagesResponse(ids=ids)

    def DeleteImages(self, request, context):
        if not request.ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "DeleteImages needs at least one id")
        ids = list(request.ids)
        owners = self.downstream.image_stubs(ids)
        if len(owners) > 1:  # all ids must exist before any shard deletes: GetVectors names an unknown one
            for name, stub, positions in owners:
                self.downstream.call_named(name, stub.GetVectors, index_pb2.GetVectorsRequest(
                    index="images", ids=[ids[p] for p in positions]), context)
        deleted = 0
        for name, stub, positions in owners:
            deleted += self.downstream.call_named(name, stub.DeleteImages, index_pb2.IndexDeleteImagesRequest(
                ids=[ids[p] for p in positions]), context).deleted
        return gateway_pb2.DeleteImagesResponse(deleted=deleted)

    def GetImage(self, request, context):
        if not request.id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "GetImage needs an image id")
        (item,) = self.downstream.image_items([request.id], context)
        return _image_result(item)

    def ListImages(self, request, context):
        limit = request.limit or bounds.MAX_LIST
        problem = bounds.limit_problem(limit)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        items = self.downstream.list_images(index_pb2.ListItemsRequest(
            index="images", folder=request.folder, after_id=request.after_id, limit=limit), context)
        return gateway_pb2.ListImagesResponse(
            images=[_image_result(item) for item in items],
            next_after_id=items[-1].id if len(items) == limit else "")

    def FindDuplicates(self, request, context):
        # float32 on the wire: 0.87 arrives as 0.8700000048; six decimals give back what the caller wrote
        threshold = round(request.threshold, 6) if request.HasField("threshold") else None
        problem = duplicates.threshold_problem(threshold) if threshold is not None else None
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.max_groups < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_groups must be 0 (all) or more; got {request.max_groups}")
        if not self.duplicates_slot.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "a near-duplicate search is already running; retry after it")
        try:
            found = self._on_one_version(lambda version: self.downstream.image_features(version, request.folder, context),
                                         context)
            if threshold is None:
                threshold = duplicates.default_threshold(found.backbone)
            try:
                groups = duplicates.near_duplicate_groups(duplicates.root_features(found.features), threshold)
            except duplicates.TooManyPairs as error:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        finally:
            self.duplicates_slot.release()
        return _duplicate_groups(found, groups, threshold, request.max_groups)

    def _on_one_version(self, attempt, context):
        """Run `attempt(version)` ("" first: whatever is current) until encoder and index agree.

        While an artifact switch is under way the encoder and the index may each serve another
        version; each also answers for the version before for a while. A refusal names the version
        the refusing service serves, and the next attempt asks everyone for that one.
        """
        version, tried = "", set()
        for number in range(VERSION_ATTEMPTS):
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                break  # the caller has given up: no more downstream calls for it
            try:
                return attempt(version)
            except VersionMismatch as mismatch:
                if mismatch.version in tried:  # both sides are mid-switch: give them a moment
                    time.sleep(min(VERSION_RETRY_PAUSE * number, max(0.0, (remaining or 1.0) / 2)))
                tried.add(version := mismatch.version)
        context.abort(grpc.StatusCode.UNAVAILABLE, "the encoder and the index are switching artifact versions; retry")

    def _search_by_image(self, index: str, image: bytes, version: str, context, k: int, min_score: float | None,
                         mode: str = "", scope: Scope = Scope(), with_vectors: bool = False):
        encoded = self.downstream.call("encoder", self.downstream.encoder.EncodeImage,
                                       encoder_pb2.EncodeImageRequest(image=image, artifact_version=version, mode=mode),
                                       context)
        return self._search(index, context, k, min_score, encoded.values, encoded.artifact_version, scope, with_vectors)

    def _mixed(self, query: Query, version: str, context, k: int, min_score: float | None, scope: Scope,
               with_explanations: bool):
        """A query of weighted terms: their vectors (one call per kind), one unit vector, one search."""
        terms, version = self._term_vectors(query, version, context)
        try:
            mixed = mixing.combine(terms)
        except mixing.MixError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        response = self._search("images", context, k, min_score, mixed.vector.tolist(), version, scope,
                                with_explanations)
        if not with_explanations:
            return response
        shares = explain.term_shares(terms, mixed.norm, explain.result_vectors(response))
        return Explained(response, self._explanations(shares, response, context))

    def _term_vectors(self, query: Query, version: str, context) -> tuple[list[mixing.WeightedVector], str]:
        """Each term's vector, all of one artifact version (the one returned): the text's words from the
        encoder, image bytes encoded in the index's mode (the encoder's default), ids' stored vectors."""
        terms: list[mixing.WeightedVector] = []
        if query.text is not None:
            encoded = self.downstream.call("encoder", self.downstream.encoder.EncodeText, encoder_pb2.EncodeTextRequest(
                text=query.text.text, artifact_version=version, with_terms=True), context)
            version = encoded.artifact_version
            terms += [mixing.WeightedVector(t.term, query.text.weight * t.weight, np.asarray(t.values, np.float32))
                      for t in encoded.term_vectors]
        vectors: dict[int, np.ndarray] = {}
        encoded_images = [(n, term.data) for n, term in enumerate(query.images) if term.data is not None]
        if encoded_images:
            encoded = self.downstream.call("encoder", self.downstream.encoder.EncodeImages, encoder_pb2.EncodeImagesRequest(
                images=[data for _, data in encoded_images], artifact_version=version), context)
            version = encoded.artifact_version
            vectors.update((n, np.asarray(v.values, np.float32)) for (n, _), v in zip(encoded_images, encoded.vectors))
        stored = [(n, term.id) for n, term in enumerate(query.images) if term.id is not None]
        if stored:
            found, version = self.downstream.image_vectors([image for _, image in stored], version, context)
            vectors.update((n, vector) for (n, _), vector in zip(stored, found))
        terms += [mixing.WeightedVector(term.name, term.weight, vectors[n]) for n, term in enumerate(query.images)]
        return terms, version

    def _explanations(self, shares: list[list[gateway_pb2.TermShare]], response: index_pb2.IndexSearchResponse,
                      context) -> list[gateway_pb2.Explanation]:
        """Each result's explanation: one word search on the index and one class call on the encoder, for
        all results at once."""
        if not response.neighbors:
            return []
        values = [index_pb2.FloatVector(values=n.vector.values) for n in response.neighbors]
        words = self.downstream.call("index", self.downstream.index.SearchMany, index_pb2.IndexSearchManyRequest(
            index="words", vectors=values, k=explain.WORDS, artifact_version=response.artifact_version), context)
        classes = self.downstream.call("encoder", self.downstream.encoder.NearestClasses, encoder_pb2.NearestClassesRequest(
            vectors=[encoder_pb2.Vector(values=n.vector.values) for n in response.neighbors], k=explain.CLASSES,
            artifact_version=response.artifact_version), context)
        return explain.explanations(shares, words, classes)

    def _similar_to_id(self, image_id: str, version: str, context, k: int, min_score: float | None, scope: Scope,
                       with_vectors: bool = False):
        request = scope.apply(index_pb2.IndexSearchRequest(index="images", k=k, min_score=min_score,
                                                           exclude_ids=[image_id], artifact_version=version,
                                                           with_vectors=with_vectors))
        if not self.downstream.shards:
            request.id = image_id
            return self.downstream.call("index", self.downstream.index.Search, request, context)
        # the image lives on one shard: search every shard with its stored vector, on its version
        stored = self.downstream.image_vector(image_id, version, context)
        request.vector.values.extend(stored.vectors[0].values)
        request.artifact_version = stored.artifact_version
        return self.downstream.search_images(request, context)

    def _search(self, index: str, context, k: int, min_score: float | None, vector, version: str,
                scope: Scope = Scope(), with_vectors: bool = False):
        request = index_pb2.IndexSearchRequest(index=index, k=k, min_score=min_score, artifact_version=version,
                                               vector=index_pb2.FloatVector(values=vector), with_vectors=with_vectors)
        if index == "images":
            return self.downstream.search_images(scope.apply(request), context)
        return self.downstream.call("index", self.downstream.index.Search, request, context)


def _watch_downstream(downstream: Downstream, health_servicer, stop: threading.Event,
                      text_cache: TextVectorCache) -> None:
    """SERVING while every downstream service is; rechecked every second, with the encoder's version."""
    serving = None
    while not stop.is_set():
        now = downstream.all_serving()
        if now and text_cache.size:
            text_cache.current = downstream.encoder_version() or text_cache.current
        if now != serving:
            common.set_serving(health_servicer, [SERVICE], now)
            log.info("downstream services %s", "SERVING" if now else "not serving")
            serving = now
        stop.wait(HEALTH_POLL_SECONDS)


@contextmanager
def run_server(port: int, encoder_address: str, index_address: str, host: str = "127.0.0.1",
               timeout: float = DEFAULT_TIMEOUT, image_shards: list[str] | None = None,
               tls: security.ServerTls | None = None, downstream_tls: security.ClientTls | None = None,
               tokens: list[str] | None = None, limits: Limits | None = None,
               telemetry: metrics.Telemetry | None = None, text_cache_size: int = DEFAULT_TEXT_CACHE,
               search_calls: int = DEFAULT_SEARCH_CALLS) -> Iterator[tuple[grpc.Server, int]]:
    """Serve the gateway on `port` (0 picks a free one); SERVING while every downstream service is.

    Addresses may list replicas (`ip:port,ip:port`); `image_shards` gives one address per image shard.
    `tls` secures this server, `downstream_tls` the calls to the encoder and index; with `tokens`,
    every call but health needs `authorization: Bearer <one of them>` (reflection too). `telemetry`:
    metrics (each downstream hop timed too), request logs and traces (each hop a span; its context goes
    downstream in the call's metadata) (default: none, unless a global SDK tracer provider is set).
    `text_cache_size`: how many text queries' vectors to keep (services/gateway/text_cache.py; 0: none).
    `search_calls`: plain image searches under way downstream at once; more wait and go together in one
    SearchMany (services/gateway/batching.py; 0: each alone).
    """
    telemetry = telemetry or metrics.Telemetry("gateway")
    downstream = Downstream(encoder_address, index_address, timeout, image_shards, downstream_tls, telemetry,
                            search_calls)
    text_cache = TextVectorCache(text_cache_size)
    servicer = GatewayServicer(downstream, text_cache, telemetry)

    def add(server: grpc.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [SERVICE]

    stop = threading.Event()
    interceptors = [security.BearerTokenInterceptor(tokens)] if tokens else []
    with common.grpc_server(port, add, host=host, tls=tls, interceptors=interceptors,
                            limits=limits, telemetry=telemetry) as (server, bound, health_servicer):
        watcher = threading.Thread(target=_watch_downstream, args=(downstream, health_servicer, stop, text_cache),
                                   name="gateway-health", daemon=True)
        watcher.start()
        try:
            yield server, bound
        finally:
            stop.set()
            watcher.join()
    downstream.close()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Gateway service: Search, Tag, SimilarImages, SimilarWords")
    parser.add_argument("--port", type=int, default=int(env("GATEWAY_PORT", 50050)))
    parser.add_argument("--host", default=env("GATEWAY_HOST", "127.0.0.1"))
    parser.add_argument("--encoder", default=env("ENCODER_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--index", default=env("INDEX_ADDRESS", "127.0.0.1:50052"))
    parser.add_argument("--image-shard", action="append",
                        help="address of one image-index shard, in shard order (repeat per shard; default: "
                             "$IMAGE_SHARDS, space-separated, else the images index of --index)")
    parser.add_argument("--timeout", type=float, default=float(env("DOWNSTREAM_TIMEOUT", DEFAULT_TIMEOUT)),
                        help="deadline in seconds for each downstream call")
    parser.add_argument("--text-cache", type=int, default=int(env("TEXT_CACHE", DEFAULT_TEXT_CACHE)),
                        help=f"text queries whose vectors are kept, so a repeated query skips the encoder "
                             f"(0: none; default {DEFAULT_TEXT_CACHE})")
    parser.add_argument("--search-calls", type=int, default=int(env("SEARCH_CALLS", DEFAULT_SEARCH_CALLS)),
                        help="plain image searches under way downstream at once; more wait and go together in "
                             f"one SearchMany call (0: each alone; default {DEFAULT_SEARCH_CALLS})")
    security.add_server_tls_arguments(parser)
    security.add_client_tls_arguments(parser, "downstream-", "DOWNSTREAM_", "the encoder and index")
    security.add_token_arguments(parser)
    limits_module.add_limit_arguments(parser)
    metrics.add_telemetry_arguments(parser, "gateway")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.text_cache < 0:
        parser.error(f"--text-cache must be >= 0, not {args.text_cache}")
    if args.search_calls < 0:
        parser.error(f"--search-calls must be >= 0, not {args.search_calls}")
    common.start_entry_point("gateway", log_format=args.log_format)
    stop = threading.Event()
    shards = args.image_shard or os.environ.get("IMAGE_SHARDS", "").split()
    tls = security.or_exit("gateway", security.server_tls_from_args, args)
    downstream_tls = security.or_exit("gateway", security.client_tls_from_args, args, "downstream-")
    tokens = security.or_exit("gateway", security.tokens_from_args, args)
    with run_server(args.port, args.encoder, args.index, args.host, args.timeout, shards,
                    tls=tls, downstream_tls=downstream_tls, tokens=tokens, limits=limits_module.limits_from_args(args),
                    telemetry=metrics.telemetry_from_args(args, "gateway"), text_cache_size=args.text_cache,
                    search_calls=args.search_calls):
        common.wait_for_signal(stop)


if __name__ == "__main__":
    main()
