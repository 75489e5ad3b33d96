"""The Gateway gRPC service: composes Encoder and Index; every downstream call has a deadline."""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import grpc

from semsearch.v1 import encoder_pb2, gateway_pb2, gateway_pb2_grpc, index_pb2
from services.common import server as common
from services.gateway.downstream import Downstream

log = logging.getLogger(__name__)

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
MAX_K = 1000
DEFAULT_TIMEOUT = 10.0
HEALTH_POLL_SECONDS = 1.0


def _check_k(k: int, context) -> None:
    if not 1 <= k <= MAX_K:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be between 1 and {MAX_K}; got {k}")


def _min_score(request, context) -> float | None:
    if not request.HasField("min_score"):
        return None
    value = request.min_score
    if math.isnan(value) or not -1.0 <= value <= 1.0:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"min_score must be a number in [-1, 1]; got {value}")
    return value


def _image_results(response: index_pb2.IndexSearchResponse) -> gateway_pb2.ImageResults:
    return gateway_pb2.ImageResults(results=[
        gateway_pb2.ImageResult(id=n.id, path=n.path, label=n.label if n.HasField("label") else None, score=n.score)
        for n in response.neighbors
    ])


def _word_results(response: index_pb2.IndexSearchResponse) -> gateway_pb2.WordResults:
    return gateway_pb2.WordResults(words=[gateway_pb2.WordResult(word=n.id, score=n.score) for n in response.neighbors])


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, downstream: Downstream):
        self.downstream = downstream

    def Search(self, request, context):
        _check_k(request.k, context)
        min_score = _min_score(request, context)
        which = request.WhichOneof("query")
        if which == "text":
            encoded = self.downstream.call("encoder", self.downstream.encoder.EncodeText,
                                           encoder_pb2.EncodeTextRequest(text=request.text), context)
            vector = encoded.vector.values
        elif which == "image":
            vector = self._encode_image(request.image, context)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Search needs a query: text or image bytes")
        return _image_results(self._search("images", context, request.k, min_score, vector=vector))

    def SimilarImages(self, request, context):
        _check_k(request.k, context)
        min_score = _min_score(request, context)
        which = request.WhichOneof("query")
        if which == "image":
            response = self._search("images", context, request.k, min_score,
                                    vector=self._encode_image(request.image, context))
        elif which == "id":
            response = self._search("images", context, request.k, min_score, id=request.id)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SimilarImages needs image bytes or an image id")
        return _image_results(response)

    def Tag(self, request, context):
        _check_k(request.k, context)
        return _word_results(self._search("words", context, request.k, None,
                                          vector=self._encode_image(request.image, context)))

    def SimilarWords(self, request, context):
        _check_k(request.k, context)
        word = request.word.strip().lower()
        if not word:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SimilarWords needs a word")
        return _word_results(self._search("words", context, request.k, None, id=word))

    def _encode_image(self, image: bytes, context):
        vector = self.downstream.call("encoder", self.downstream.encoder.EncodeImage,
                                      encoder_pb2.EncodeImageRequest(image=image), context)
        return vector.values

    def _search(self, index: str, context, k: int, min_score: float | None, *, vector=None, id=None):
        request = index_pb2.IndexSearchRequest(index=index, k=k, min_score=min_score)
        if id is not None and (index == "words" or not self.downstream.shards):
            request.id = id
        elif id is not None:  # the image lives on one shard: search every shard with its stored vector
            request.vector.values.extend(self.downstream.image_vector(id, context))
        else:
            request.vector.values.extend(vector)
        if id is not None:
            request.exclude_ids.append(id)
        if index == "images":
            return self.downstream.search_images(request, context)
        return self.downstream.call("index", self.downstream.index.Search, request, context)


def _watch_downstream(downstream: Downstream, health_servicer, stop: threading.Event) -> None:
    """SERVING while every downstream service is; rechecked every second."""
    serving = None
    while not stop.is_set():
        now = downstream.all_serving()
        if now != serving:
            common.set_serving(health_servicer, [SERVICE], now)
            log.info("downstream services %s", "SERVING" if now else "not serving")
            serving = now
        stop.wait(HEALTH_POLL_SECONDS)


@contextmanager
def run_server(port: int, encoder_address: str, index_address: str, host: str = "127.0.0.1",
               timeout: float = DEFAULT_TIMEOUT, image_shards: list[str] | None = None) -> Iterator[tuple[grpc.Server, int]]:
    """Serve the gateway on `port` (0 picks a free one); SERVING while every downstream service is.

    Addresses may list replicas (`ip:port,ip:port`); `image_shards` gives one address per image shard.
    """
    downstream = Downstream(encoder_address, index_address, timeout, image_shards)
    servicer = GatewayServicer(downstream)

    def add(server: grpc.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [SERVICE]

    stop = threading.Event()
    with common.grpc_server(port, add, host=host) as (server, bound, health_servicer):
        watcher = threading.Thread(target=_watch_downstream, args=(downstream, health_servicer, stop),
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    common.start_entry_point("gateway")
    stop = threading.Event()
    shards = args.image_shard or os.environ.get("IMAGE_SHARDS", "").split()
    with run_server(args.port, args.encoder, args.index, args.host, args.timeout, shards):
        common.wait_for_signal(stop)


if __name__ == "__main__":
    main()
