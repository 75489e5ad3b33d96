"""The Encoder gRPC service: a thin servicer over EncoderCore."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import grpc
import numpy as np

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc
from services.common import bounds
from services.common import limits as limits_module
from services.common import metrics
from services.common import security
from services.common.limits import Limits
from services.common import server as common
from services.encoder.core import EncoderCore
from services.encoder.images import ImageError
from services.encoder.modes import UnknownModeError
from services.encoder.query import QueryError, UnknownWordsError

log = logging.getLogger(__name__)

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name
DECODE_SLOTS = 2
MAX_VECTORS = 1000  # per NearestClasses call


def _vector(values) -> encoder_pb2.Vector:
    return encoder_pb2.Vector(values=values.tolist())


def _with_terms(terms, term_vectors, version: str) -> encoder_pb2.EncodeTextResponse:
    """The words of a larger query: each term's vector; the caller sums them with its own."""
    return encoder_pb2.EncodeTextResponse(
        terms=[encoder_pb2.WeightedTerm(word=t.word, weight=t.weight) for t in terms],
        term_vectors=[encoder_pb2.TermVector(term=t.term, weight=t.weight, values=t.vector.tolist())
                      for t in term_vectors],
        artifact_version=version)


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, loading: common.Loading, telemetry: metrics.Telemetry):
        self.loading = loading
        self.telemetry = telemetry

    def EncodeText(self, request, context):
        core: EncoderCore = self.loading.get(context, request.artifact_version)
        try:
            if request.with_terms:
                return _with_terms(*core.text_terms(request.text), core.version)
            vector, terms = core.encode_text(request.text)
        except QueryError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except UnknownWordsError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return encoder_pb2.EncodeTextResponse(
            vector=_vector(vector),
            terms=[encoder_pb2.WeightedTerm(word=t.word, weight=t.weight) for t in terms],
            artifact_version=core.version,
        )

    def NearestClasses(self, request, context):
        core: EncoderCore = self.loading.get(context, request.artifact_version)
        if len(request.vectors) > MAX_VECTORS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.vectors)} vectors in one call; the limit is {MAX_VECTORS}")
        problem = bounds.k_problem(request.k)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        vectors = np.asarray([v.values for v in request.vectors], np.float32).reshape(len(request.vectors), -1)
        if len(vectors) and (vectors.shape[1] != core.dimension or not np.all(np.isfinite(vectors))):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"NearestClasses takes finite vectors of dimension {core.dimension}")
        try:
            found = core.nearest_classes(vectors, request.k, request.mode or None)
        except UnknownModeError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return encoder_pb2.NearestClassesResponse(lists=[
            encoder_pb2.ClassList(classes=[encoder_pb2.ImageNetClass(name=name, score=score) for name, score in classes])
            for classes in found], artifact_version=core.version)

    def EncodeImage(self, request, context):
        vectors, _, version = self._encode([request.image], request.artifact_version, request.mode, context)
        return encoder_pb2.Vector(values=vectors[0].tolist(), artifact_version=version)

    def EncodeImages(self, request, context):
        problem = bounds.images_problem(len(request.images))
        if problem:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
        if not request.images:
            return encoder_pb2.EncodeImagesResponse()
        vectors, features, version = self._encode(list(request.images), request.artifact_version, request.mode,
                                                  context, request.with_features)
        return encoder_pb2.EncodeImagesResponse(vectors=[_vector(v) for v in vectors], artifact_version=version,
                                                features=[_vector(f) for f in features] if request.with_features else [])

    def Info(self, request, context):
        core: EncoderCore = self.loading.get(context)
        return encoder_pb2.EncoderInfo(**core.info(), default_mode=core.default_mode, modes=core.list_modes())

    def _encode(self, images: list[bytes], version: str, mode: str, context, with_features: bool = False):
        """(vectors, backbone features (unit length) or None, version)."""
        core: EncoderCore = self.loading.get(context, version)
        start = time.perf_counter()
        try:
            vectors, features = core.encode_images_and_features(images, mode or None)
            self.telemetry.encoded_images(len(images), time.perf_counter() - start)
            if with_features:
                features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
            return vectors, features, core.version
        except (ImageError, UnknownModeError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


@contextmanager
def run_server(port: int, artifacts: str, host: str = "127.0.0.1", threads: int = 0,
               on_load_failure=None, tls: security.ServerTls | None = None,
               reload_seconds: float = common.RELOAD_SECONDS, decode_slots: int = DECODE_SLOTS,
               limits: Limits | None = None,
               telemetry: metrics.Telemetry | None = None) -> Iterator[tuple[grpc.Server, int]]:
    """Serve the encoder on `port` (0 picks a free one); health turns SERVING once the model has loaded.

    At most `decode_slots` images are decoded at once, whatever the number of calls (every artifact
    version shares them), which bounds the memory that decoding can take.
    With `tls` it speaks TLS only (mutual TLS when `tls` names a client CA). A newly published
    artifact is switched to without a restart (checked every `reload_seconds`; 0: never).
    `telemetry`: metrics, request logs and traces (default: metrics recorded, not served; traces if a
    global SDK tracer provider is set).
    """
    telemetry = telemetry or metrics.Telemetry("encoder")
    slots = threading.BoundedSemaphore(max(1, decode_slots))
    with common.serve_when_loaded(
        port, host, SERVICE,
        lambda server, loading: encoder_pb2_grpc.add_EncoderServicer_to_server(EncoderServicer(loading, telemetry),
                                                                               server),
        artifacts, lambda directory: EncoderCore(directory, threads=threads, decode_slots=slots), on_load_failure,
        tls=tls, reload_seconds=reload_seconds, limits=limits, telemetry=telemetry,
    ) as running:
        yield running


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Encoder service: text or images -> vectors")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ENCODER_PORT", 50051)))
    parser.add_argument("--host", default=os.environ.get("ENCODER_HOST", "127.0.0.1"))
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ENCODER_THREADS", 0)),
                        help="ONNX Runtime threads (0: one per core)")
    parser.add_argument("--decode-slots", type=int, default=int(os.environ.get("ENCODER_DECODE_SLOTS", DECODE_SLOTS)),
                        help=f"images decoded at once, over all calls (default {DECODE_SLOTS})")
    limits_module.add_limit_arguments(parser)
    security.add_server_tls_arguments(parser)
    common.add_reload_argument(parser)
    metrics.add_telemetry_arguments(parser, "encoder")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    common.start_entry_point("encoder", args.artifacts, args.log_format)
    tls = security.or_exit("encoder", security.server_tls_from_args, args)
    sys.exit(common.serve_forever(run_server, args.port, args.artifacts, args.host, args.threads, tls=tls,
                                  reload_seconds=args.reload_seconds, decode_slots=args.decode_slots,
                                  limits=limits_module.limits_from_args(args),
                                  telemetry=metrics.telemetry_from_args(args, "encoder")))


if __name__ == "__main__":
    main()
