"""The gateway's downstream services: channels (with replicas), deadlines, shard fan-out, error mapping."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import json
import logging
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import security
from services.common.metrics import Telemetry
from services.common import server as common
from services.common.shards import merge, shard_of
from services.gateway.batching import DEFAULT_IN_FLIGHT, Coalescer

log = logging.getLogger(__name__)

_ENCODER = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]
_INDEX = index_pb2.DESCRIPTOR.services_by_name["Index"]

HEALTH_TIMEOUT = 1.0
# Client errors pass through unchanged; a downstream that is down or slow is UNAVAILABLE.
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION}  # (a version refusal, which names a version, is retried first)
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

# Round robin over every address a target resolves to (replicas); a call that finds a replica
# gone (UNAVAILABLE) is tried once more on another. Searches are read-only and an added image's id
# is its content hash, so a retried call changes nothing twice. Retries have a budget per channel
# (retryThrottling): when more than half the recent calls failed, calls are no longer retried, so a
# struggling service is not sent twice the load.
RETRY_ATTEMPTS = 2
_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "semsearch.v1.Encoder"}, {"service": "semsearch.v1.Index"}],
        "retryPolicy": {"maxAttempts": RETRY_ATTEMPTS, "initialBackoff": "0.01s", "maxBackoff": "0.2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
})


def grpc_target(address: str) -> str:
    """`host:port`, a gRPC target (`dns:///svc:50051`), or replicas `ip:port,ip:port` -> a gRPC target."""
    if "," not in address:
        return address
    replicas = [part.strip() for part in address.split(",") if part.strip()]
    families = set()
    for replica in replicas:
        host = replica.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(f"replica lists take IP addresses (got {replica!r}); "
                             "for host names use one DNS name that resolves to every replica") from None
    if len(families) > 1:
        raise ValueError(f"replica list mixes IPv4 and IPv6: {address}")
    return f"ipv{families.pop()}:{','.join(replicas)}"


def channel(address: str, tls: security.ClientTls | None = None) -> grpc.Channel:
    """A channel to `address`: TLS when `tls` is given (mutual TLS when it holds a client certificate)."""
    return security.channel(grpc_target(address), tls, options=[
        ("grpc.max_receive_message_length", common.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", common.MAX_MESSAGE_BYTES),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ])


class VersionMismatch(Exception):
    """A downstream service serves another artifact version than the one asked for."""

    def __init__(self, version: str):
        super().__init__(version)
        self.version = version


def _served_version(error: grpc.RpcError) -> str | None:
    """The version a service named when it refused ours (FAILED_PRECONDITION), else None."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    return dict(error.trailing_metadata() or ()).get(common.VERSION_METADATA)


@dataclass(frozen=True)
class ImageFeatures:
    """The backbone features of the image index, gathered from every process that holds part of it."""

    items: list[index_pb2.Item]
    features: np.ndarray  # float16 unit rows, in the order of `items`
    without_features: int  # images left out: added live without features
    version: str
    backbone: str = ""  # the backbone that made them (artifact.Backbone.identity)


class Downstream:
    """Long-lived channels to the encoder, the index (words, and images unless sharded) and image shards."""

    def __init__(self, encoder_address: str, index_address: str, timeout: float,
                 image_shard_addresses: list[str] | None = None, tls: security.ClientTls | None = None,
                 telemetry: Telemetry | None = None, in_flight: int = DEFAULT_IN_FLIGHT):
        self.timeout = timeout
        self.addresses = {"encoder": encoder_address, "index": index_address}
        self.shard_addresses = list(image_shard_addresses or [])
        self.channels = {name: channel(address, tls) for name, address in self.addresses.items()}
        self.shard_channels = [channel(address, tls) for address in self.shard_addresses]
        # the stubs' calls are timed and traced per hop (the health checks below are not)
        self.encoder = _observed(encoder_pb2_grpc.EncoderStub, _ENCODER, self.channels["encoder"], telemetry, "encoder")
        self.index = _observed(index_pb2_grpc.IndexStub, _INDEX, self.channels["index"], telemetry, "index")
        self.shards = [_observed(index_pb2_grpc.IndexStub, _INDEX, ch, telemetry, f"index-shard-{number}")
                       for number, ch in enumerate(self.shard_channels)]
        # unfiltered image searches that arrive together go in one SearchMany (services/gateway/batching.py)
        self.plain_searches = Coalescer(self._search_many, in_flight) if in_flight else None
        self.searches_per_call = telemetry.searches_per_call if telemetry is not None and telemetry.metrics_on else None

    def deadline(self, context: grpc.ServicerContext) -> float:
        """Our timeout, or what is left of the caller's deadline if that is sooner."""
        remaining = context.time_remaining()
        return self.timeout if remaining is None else max(0.001, min(self.timeout, remaining))

    def call(self, name: str, method, request, context: grpc.ServicerContext):
        """Call `method` with a deadline; map its errors to ours (VersionMismatch when versions differ)."""
        return self.call_named(f"the {name} service", method, request, context)

    def call_named(self, downstream: str, method, request, context):
        try:
            return method(request, timeout=self.deadline(context))
        except grpc.RpcError as error:
            self._fail(error, downstream, context)


    @staticmethod
    def _fail(error: grpc.RpcError, downstream: str, context):
        """VersionMismatch when the service serves another artifact version; else abort with our status."""
        version = _served_version(error)
        if version is not None:
            raise VersionMismatch(version) from None
        abort_for(error, downstream, context)

    def search_images(self, request: index_pb2.IndexSearchRequest, context) -> index_pb2.IndexSearchResponse:
        """Search the image index, fanning out to every shard (concurrently) when it is sharded.

        Plain searches (`_plain`) that arrive while others are under way wait and go together in one
        SearchMany call (services/gateway/batching.py); a search that finds no wait goes alone, as Search.
        A shard that fails fails the whole call with UNAVAILABLE naming it: a merged answer
        without that shard would silently miss images.
        """
        if self.plain_searches is None or not _plain(request):
            return self._search_alone(request, context)
        try:
            return self.plain_searches.submit((request.k, request.artifact_version), (request, context))
        except grpc.RpcError as error:
            self._fail(error, getattr(error, "downstream", "the index service"), context)

    def _search_alone(self, request: index_pb2.IndexSearchRequest, context) -> index_pb2.IndexSearchResponse:
        if not self.shards:
            return self.call("index", self.index.Search, request, context)
        timeout = self.deadline(context)
        pending = [stub.Search.future(request, timeout=timeout) for stub in self.shards]
        answers = []
        for number, future in enumerate(pending):
            try:
                answers.append(future.result())
            except grpc.RpcError as error:
                for other in pending:
                    other.cancel()
                self._fail(error, self._shard_name(number), context)
        best = merge([a.neighbors for a in answers], request.k, lambda neighbor: (neighbor.score, neighbor.id))
        return index_pb2.IndexSearchResponse(neighbors=best, artifact_version=answers[0].artifact_version)

    def _search_many(self, key: tuple[int, str], searches: list[tuple[index_pb2.IndexSearchRequest, object]]
                     ) -> list[index_pb2.IndexSearchResponse]:
        """Plain image searches of one k and version: one alone is a Search (run in its caller's thread, which
        sends its own batch: errors map to its status as usual); more go in one SearchMany per image process
        (merged per search when sharded) with the longest of their deadlines, and an error raised names its
        process in `.downstream`."""
        if self.searches_per_call is not None:
            self.searches_per_call.observe(len(searches))
        if len(searches) == 1:
            return [self._search_alone(*searches[0])]
        k, version = key
        request = index_pb2.IndexSearchManyRequest(index="images", k=k, artifact_version=version,
                                                   vectors=[search.vector for search, _ in searches])
        timeout = max(self.deadline(context) for _, context in searches)
        processes = [(self._shard_name(n), stub) for n, stub in enumerate(self.shards)] or [("the index service", self.index)]
        pending = [stub.SearchMany.future(request, timeout=timeout) for _, stub in processes]
        answers = []
        for (name, _), future in zip(processes, pending):
            try:
                answers.append(future.result())
            except grpc.RpcError as error:
                for other in pending:
                    other.cancel()
                error.downstream = name
                raise
        version = answers[0].artifact_version
        return [index_pb2.IndexSearchResponse(artifact_version=version, neighbors=merge(
            [answer.results[position].neighbors for answer in answers], k, lambda neighbor: (neighbor.score, neighbor.id)))
            for position in range(len(searches))]

    def _shard_name(self, number: int) -> str:
        return f"image shard {number} of {len(self.shards)}"

    def image_vector(self, image_id: str, version: str, context) -> index_pb2.GetVectorsResponse:
        """The stored vector of an indexed image (and its version), from the shard that holds it."""
        request = index_pb2.GetVectorsRequest(index="images", ids=[image_id], artifact_version=version)
        number = shard_of(image_id, len(self.shards))
        try:
            return self.shards[number].GetVectors(request, timeout=self.deadline(context))
        except grpc.RpcError as error:
            self._fail(error, self._shard_name(number), context)

    def image_vectors(self, ids: list[str], version: str, context) -> tuple[list[np.ndarray], str]:
        """Indexed images' stored vectors, in order, and their artifact version: one GetVectors call per
        process that holds some of them. NOT_FOUND (passed through) names an unknown id."""
        found: dict[str, np.ndarray] = {}
        for name, stub, positions in self.image_stubs(ids):
            answer = self.call_named(name, stub.GetVectors, index_pb2.GetVectorsRequest(
                index="images", ids=[ids[p] for p in positions], artifact_version=version), context)
            version = answer.artifact_version
            found.update((item.id, np.asarray(vector.values, np.float32))
                         for item, vector in zip(answer.items, answer.vectors))
        return [found[item_id] for item_id in ids], version

    def image_items(self, ids: list[str], context) -> list[index_pb2.Item]:
        """Indexed images' items (id, path, label), in order, from the processes that hold them."""
        found: dict[str, index_pb2.Item] = {}
        for name, stub, positions in self.image_stubs(ids):
            answer = self.call_named(name, stub.GetVectors, index_pb2.GetVectorsRequest(
                index="images", ids=[ids[p] for p in positions]), context)
            found.update((item.id, item) for item in answer.items)
        return [found[item_id] for item_id in ids]

    def list_images(self, request: index_pb2.ListItemsRequest, context) -> list[index_pb2.Item]:
        """The image index's items in id order, from every shard (merged) when it is sharded."""
        if not self.shards:
            return list(self.call("index", self.index.ListItems, request, context).items)
        answers = [self.call_named(self._shard_name(number), stub.ListItems, request, context)
                   for number, stub in enumerate(self.shards)]
        return list(itertools.islice(heapq.merge(*(a.items for a in answers), key=lambda item: item.id), request.limit))

    def image_features(self, version: str, folder: str, context) -> ImageFeatures:
        """Every indexed image's backbone features (under `folder`), all from one artifact version: the first
        image process answers for `version` ("" for its current one), the others for the version it gave."""
        processes = [(self._shard_name(n), stub) for n, stub in enumerate(self.shards)] or [("the index service", self.index)]
        items, blocks, without, backbone = [], [], 0, ""
        for name, stub in processes:
            request = index_pb2.ImageFeaturesRequest(artifact_version=version, folder=folder)
            try:
                for chunk in stub.ImageFeatures(request, timeout=self.deadline(context)):
                    version, without = chunk.artifact_version, without + chunk.without_features
                    backbone = backbone or chunk.backbone
                    items.extend(chunk.items)
                    blocks.append(np.frombuffer(chunk.features, dtype="<f2").reshape(-1, max(chunk.dimension, 1)))
            except grpc.RpcError as error:
                self._fail(error, name, context)
        features = np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float16)
        return ImageFeatures(items, features, without, version, backbone)

    def image_stubs(self, ids: list[str]) -> list[tuple[str, object, list[int]]]:
        """(name, stub, positions in `ids`) of each image-index process that owns some of `ids`."""
        if not self.shards:
            return [("the index service", self.index, list(range(len(ids))))]
        owners: dict[int, list[int]] = {}
        for position, item_id in enumerate(ids):
            owners.setdefault(shard_of(item_id, len(self.shards)), []).append(position)
        return [(self._shard_name(number), self.shards[number], positions) for number, positions in owners.items()]


    def all_serving(self) -> bool:
        for ch in [*self.channels.values(), *self.shard_channels]:
            try:
                response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
            except grpc.RpcError:
                return False
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def encoder_version(self) -> str:
        """The artifact version the encoder serves now ("" when it does not answer)."""
        try:
            info = encoder_pb2_grpc.EncoderStub(self.channels["encoder"]).Info(encoder_pb2.EncoderInfoRequest(),
                                                                              timeout=HEALTH_TIMEOUT)
        except grpc.RpcError:
            return ""
        return info.artifact_version

    def close(self) -> None:
        for ch in [*self.channels.values(), *self.shard_channels]:
            ch.close()


def _plain(request: index_pb2.IndexSearchRequest) -> bool:
    """An image search by vector with no filter, threshold, exclusion, page or vectors: what SearchMany answers."""
    return (request.index == "images" and request.HasField("vector") and not request.HasField("min_score")
            and not request.exclude_ids and not request.labels and not request.folder and not request.HasField("after")
            and not request.HasField("taken_since") and not request.HasField("taken_until") and not request.with_vectors)


def _observed(make_stub, service, ch: grpc.Channel, telemetry: Telemetry | None, hop: str):
    """A stub of `service` on `ch` for `hop`: each call a span (when tracing) and timed (when metrics are on)."""
    if telemetry is None:
        return make_stub(ch)
    interceptors = telemetry.channel_interceptors(hop)
    return telemetry.downstream_stub(make_stub(grpc.intercept_channel(ch, *interceptors) if interceptors else ch),
                                     service, hop)


def abort_for(error: grpc.RpcError, downstream: str, context: grpc.ServicerContext):
    """Our status for a downstream error. Callers outside see no address or downstream detail
    (those go to the log), except the client errors, which are about their own request."""
    code, details = error.code(), error.details()
    if code in _PASS_THROUGH:
        context.abort(code, details)
    if code in _UNAVAILABLE:
        log.warning("%s is unavailable: %s %s", downstream, code.name, details)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{downstream} is unavailable ({code.name})")
    log.error("%s failed: %s %s", downstream, code, details)
    context.abort(grpc.StatusCode.INTERNAL, f"{downstream} failed: {code.name}")
