"""The Index gRPC service: a thin servicer over the ScaNN IndexSet of one artifact."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc

from semsearch.v1 import index_pb2, index_pb2_grpc
from services.common import artifact
from services.common import bounds
from services.common import limits as limits_module
from services.common import metrics
from services.common import security
from services.common.limits import Limits
from services.common import server as common
from services.index.core import IndexSet, InvalidQuery, NoFeatures, UnknownId, UnknownIndex
from services.index.live import LiveImages
from services.index.selection import Cursor, Selection, folder_prefix, selection_problem

log = logging.getLogger(__name__)

SERVICE = index_pb2.DESCRIPTOR.services_by_name["Index"].full_name
MAX_IDS = 1000
LIVE_INDEX = "images"


def load_index_set(directory: Path, names: list[str] | None = None, shard: int | None = None) -> IndexSet:
    """One artifact version's indexes; the image index carries the live log of the artifact root."""
    manifest = artifact.read_manifest(directory)
    indexes = IndexSet.load(directory / artifact.INDEXES, manifest.version, names, shard)
    if LIVE_INDEX in indexes.indexes:
        indexes.indexes[LIVE_INDEX] = LiveImages(indexes.indexes[LIVE_INDEX], directory.parent, manifest.space,
                                                 indexes.shards.get(LIVE_INDEX), manifest.backbone.identity)
    return indexes


def _selection(request: index_pb2.IndexSearchRequest) -> Selection:
    cursor = Cursor(request.after.score, request.after.id, request.after.skipped) if request.HasField("after") else None
    since = request.taken_since if request.HasField("taken_since") else None
    until = request.taken_until if request.HasField("taken_until") else None
    problem = selection_problem(list(request.labels), request.folder, cursor, (since, until))
    if problem:
        raise InvalidQuery(problem)
    return Selection(frozenset(request.labels), folder_prefix(request.folder), since, until, cursor)


def _neighbors(hits) -> list[index_pb2.Neighbor]:
    return [index_pb2.Neighbor(id=hit.item.id, score=hit.score, path=hit.item.path, label=hit.item.label)
            for hit in hits]


def _with_vectors(index, neighbors: list[index_pb2.Neighbor]) -> list[index_pb2.Neighbor]:
    """The neighbours with their stored vectors; one deleted since the search is left out."""
    kept = []
    for neighbor in neighbors:
        try:
            neighbor.vector.values.extend(index.vector_of(neighbor.id).tolist())
        except UnknownId:
            continue
        kept.append(neighbor)
    return kept


def _abort_unwritable(error: OSError, context) -> None:
    """The live log could not be written: nothing was acknowledged, so the caller may retry elsewhere."""
    log.error("cannot write the live log: %s", error)
    context.abort(grpc.StatusCode.INTERNAL, f"the index cannot write its live log ({error.strerror}); nothing was changed")


def _live_images(indexes: IndexSet) -> LiveImages:
    return indexes.get(LIVE_INDEX)


class IndexServicer(index_pb2_grpc.IndexServicer):
    def __init__(self, loading: common.Loading, telemetry: metrics.Telemetry):
        self.loading = loading
        self.telemetry = telemetry

    def Search(self, request, context):
        indexes: IndexSet = self.loading.get(context, request.artifact_version)
        min_score = request.min_score if request.HasField("min_score") else None
        try:
            index = indexes.get(request.index)
            which = request.WhichOneof("query")
            if which == "vector":
                query = request.vector.values
            elif which == "id":
                query = index.vector_of(request.id)
            else:
                raise InvalidQuery("the request needs a query: a vector or an id")
            hits = index.search(query, request.k, min_score, exclude=set(request.exclude_ids),
                                selection=_selection(request))
        except InvalidQuery as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except (UnknownIndex, UnknownId) as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        neighbors = _neighbors(hits)
        if request.with_vectors:
            neighbors = _with_vectors(index, neighbors)
        return index_pb2.IndexSearchResponse(neighbors=neighbors, artifact_version=indexes.version)

    def SearchMany(self, request, context):
        indexes: IndexSet = self.loading.get(context, request.artifact_version)
        if len(request.vectors) > MAX_IDS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.vectors)} vectors in one call; the limit is {MAX_IDS}")
        try:
            index = indexes.get(request.index)
            queries = [vector.values for vector in request.vectors]
            batched = getattr(index, "search_many", None)  # a plain index; live or sharded ones search each
            results = batched(queries, request.k) if batched else [index.search(q, request.k) for q in queries]
        except InvalidQuery as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except UnknownIndex as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return index_pb2.IndexSearchManyResponse(
            results=[index_pb2.NeighborList(neighbors=_neighbors(hits)) for hits in results],
            artifact_version=indexes.version)

    def GetVectors(self, request, context):
        indexes: IndexSet = self.loading.get(context, request.artifact_version)
        if len(request.ids) > MAX_IDS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(request.ids)} ids in one call; the limit is {MAX_IDS}")
        try:
            index = indexes.get(request.index)
            vectors = [index.vector_of(item_id) for item_id in request.ids]
            items = [index.item_of(item_id) for item_id in request.ids]
        except (UnknownIndex, UnknownId) as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return index_pb2.GetVectorsResponse(vectors=[index_pb2.FloatVector(values=v.tolist()) for v in vectors],
                                            artifact_version=indexes.version,
                                            items=[index_pb2.Item(id=i.id, path=i.path, label=i.label) for i in items])

    def AddImages(self, request, context):
        indexes: IndexSet = self.loading.get(context, request.artifact_version, current_only=True)
        problem = bounds.images_problem(len(request.images))
        if problem:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
        try:
            ids = _live_images(indexes).add([
                (image.id, image.image, image.vector.values, image.label if image.HasField("label") else None,
                 image.features.values) for image in request.images])
        except InvalidQuery as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except UnknownIndex as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except OSError as error:
            _abort_unwritable(error, context)
        self.telemetry.live_added.inc(len(ids))
        return index_pb2.IndexAddImagesResponse(ids=ids)

    def DeleteImages(self, request, context):
        indexes: IndexSet = self.loading.get(context)
        if len(request.ids) > MAX_IDS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(request.ids)} ids in one call; the limit is {MAX_IDS}")
        try:
            deleted = _live_images(indexes).delete(list(request.ids))
        except InvalidQuery as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except (UnknownIndex, UnknownId) as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except OSError as error:
            _abort_unwritable(error, context)
        self.telemetry.live_deleted.inc(deleted)
        return index_pb2.IndexDeleteImagesResponse(deleted=deleted)

    def ListItems(self, request, context):
        indexes: IndexSet = self.loading.get(context)
        problem = bounds.limit_problem(request.limit)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            items = indexes.get(request.index).list_items(folder_prefix(request.folder), request.after_id, request.limit)
        except UnknownIndex as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return index_pb2.ListItemsResponse(items=[index_pb2.Item(id=i.id, path=i.path, label=i.label) for i in items],
                                           artifact_version=indexes.version)

    def ImageFeatures(self, request, context):
        indexes: IndexSet = self.loading.get(context, request.artifact_version)
        try:
            problem = selection_problem([], request.folder, None)
            if problem:
                raise InvalidQuery(problem)
            images = _live_images(indexes)
            folder = folder_prefix(request.folder)
            chunks = images.feature_chunks(folder)
        except InvalidQuery as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except UnknownIndex as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except NoFeatures:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"artifact version {indexes.version} keeps no backbone features (it was built before "
                          "near-duplicate search); rebuild it with `make index INDEX_DATA=<folder>` or `make batch-train`")
        yield index_pb2.ImageFeaturesChunk(dimension=images.feature_dimension, artifact_version=indexes.version,
                                           without_features=images.without_features(folder), backbone=images.backbone)
        for items, features in chunks:
            yield index_pb2.ImageFeaturesChunk(
                items=[index_pb2.Item(id=i.id, path=i.path, label=i.label) for i in items],
                features=features.astype("<f2").tobytes(), dimension=images.feature_dimension,
                artifact_version=indexes.version)

    def Info(self, request, context):
        indexes: IndexSet = self.loading.get(context)
        names = [request.index] if request.index else sorted(indexes.indexes)
        try:
            described = [indexes.get(name) for name in names]
        except UnknownIndex as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return index_pb2.IndexInfo(
            indexes=[index_pb2.IndexDescription(name=i.name, size=len(i), dimension=i.dimension, method=i.config.method,
                                                shard=indexes.shards.get(i.name, (0, 0))[0],
                                                shards=indexes.shards.get(i.name, (0, 0))[1])
                     for i in described],
            artifact_version=indexes.version,
        )


@contextmanager
def run_server(port: int, artifacts: str, host: str = "127.0.0.1", names: list[str] | None = None,
               shard: int | None = None, on_load_failure=None, tls: security.ServerTls | None = None,
               reload_seconds: float = common.RELOAD_SECONDS,
               limits: Limits | None = None,
               telemetry: metrics.Telemetry | None = None) -> Iterator[tuple[grpc.Server, int]]:
    """Serve the indexes on `port` (0 picks a free one); health turns SERVING once they have loaded.

    `names` limits which indexes load; `shard` serves one shard of each sharded index. With `tls` it
    speaks TLS only (mutual TLS when `tls` names a client CA). A newly published artifact is
    switched to without a restart (checked every `reload_seconds`; 0: never). `telemetry`: metrics,
    request logs and traces (default: metrics recorded, not served; traces if a global SDK tracer
    provider is set).
    """
    telemetry = telemetry or metrics.Telemetry("index")

    def register(server: grpc.Server, loading: common.Loading) -> None:
        index_pb2_grpc.add_IndexServicer_to_server(IndexServicer(loading, telemetry), server)
        telemetry.count_vectors(lambda: _sizes(loading))

    with common.serve_when_loaded(
        port, host, SERVICE, register,
        artifacts, lambda directory: load_index_set(directory, names, shard), on_load_failure, tls=tls,
        reload_seconds=reload_seconds, limits=limits, telemetry=telemetry,
    ) as running:
        yield running


def _sizes(loading: common.Loading) -> dict[str, int]:
    """Vectors in each index of the current version (none until it has loaded)."""
    core = loading.core
    return {} if core is None else {name: len(index) for name, index in core.indexes.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Index service: ScaNN k-NN over images and words")
    parser.add_argument("--port", type=int, default=int(os.environ.get("INDEX_PORT", 50052)))
    parser.add_argument("--host", default=os.environ.get("INDEX_HOST", "127.0.0.1"))
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--indexes", default=os.environ.get("INDEXES", ""),
                        help="comma-separated index names to serve (default: all)")
    parser.add_argument("--shard", type=int, default=None,
                        help="serve only this shard of each sharded index (default: all shards, merged)")
    common.add_reload_argument(parser)
    limits_module.add_limit_arguments(parser)
    security.add_server_tls_arguments(parser)
    metrics.add_telemetry_arguments(parser, "index")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    common.start_entry_point("index", args.artifacts, args.log_format)
    names = [name for name in args.indexes.split(",") if name] or None
    tls = security.or_exit("index", security.server_tls_from_args, args)
    sys.exit(common.serve_forever(run_server, args.port, args.artifacts, args.host, names, args.shard, tls=tls,
                                  reload_seconds=args.reload_seconds, limits=limits_module.limits_from_args(args),
                                  telemetry=metrics.telemetry_from_args(args, "index")))


if __name__ == "__main__":
    main()
