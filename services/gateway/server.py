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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import server as common

log = logging.getLogger(__name__)

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
MAX_K = 1000
DEFAULT_TIMEOUT = 10.0
HEALTH_POLL_SECONDS = 1.0
# Client errors pass through unchanged; a downstream that is down or slow is UNAVAILABLE.
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", common.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", common.MAX_MESSAGE_BYTES),
    ])


class Downstream:
    """Long-lived channels and stubs to the encoder and the index, shared by all calls."""

    def __init__(self, encoder_address: str, index_address: str, timeout: float):
        self.timeout = timeout
        self.addresses = {"encoder": encoder_address, "index": index_address}
        self.channels = {name: _channel(address) for name, address in self.addresses.items()}
        self.encoder = encoder_pb2_grpc.EncoderStub(self.channels["encoder"])
        self.index = index_pb2_grpc.IndexStub(self.channels["index"])
        self.health = {name: health_pb2_grpc.HealthStub(ch) for name, ch in self.channels.items()}

    def call(self, name: str, method, request, context: grpc.ServicerContext):
        """Call `method` with a deadline (ours, or the caller's if sooner); map its errors to ours."""
        remaining = context.time_remaining()
        timeout = self.timeout if remaining is None else max(0.001, min(self.timeout, remaining))
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if code in _PASS_THROUGH:
                context.abort(code, details)
            if code in _UNAVAILABLE:
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"{name} service at {self.addresses[name]} is unavailable ({code.name}: {details})")
            log.error("%s service failed: %s %s", name, code, details)
            context.abort(grpc.StatusCode.INTERNAL, f"{name} service failed: {code.name}")

    def all_serving(self) -> bool:
        for stub in self.health.values():
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_POLL_SECONDS)
            except grpc.RpcError:
                return False
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


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
        if id is not None:
            request.id = id
            request.exclude_self = True
        else:
            request.vector.values.extend(vector)
        return self.downstream.call("index", self.downstream.index.Search, request, context)


def _watch_downstream(downstream: Downstream, health_servicer, stop: threading.Event) -> None:
    """SERVING while both downstream services are; rechecked every second."""
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
               timeout: float = DEFAULT_TIMEOUT) -> Iterator[tuple[grpc.Server, int]]:
    """Serve the gateway on `port` (0 picks a free one); SERVING while encoder and index are."""
    downstream = Downstream(encoder_address, index_address, timeout)
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


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Gateway service: Search, Tag, SimilarImages, SimilarWords")
    parser.add_argument("--port", type=int, default=int(env("GATEWAY_PORT", 50050)))
    parser.add_argument("--host", default=env("GATEWAY_HOST", "127.0.0.1"))
    parser.add_argument("--encoder", default=env("ENCODER_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--index", default=env("INDEX_ADDRESS", "127.0.0.1:50052"))
    parser.add_argument("--timeout", type=float, default=float(env("DOWNSTREAM_TIMEOUT", DEFAULT_TIMEOUT)),
                        help="deadline in seconds for each downstream call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    with run_server(args.port, args.encoder, args.index, args.host, args.timeout):
        common.wait_for_signal(stop)


if __name__ == "__main__":
    main()
