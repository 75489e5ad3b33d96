"""Metrics and request logs, scraped and read from real servers on loopback.

The gateway tests need no artifact: the gateway is real, its encoder and index are small fakes
(real gRPC servers that answer from fixed vectors), which is enough for the plumbing (interceptor,
hop timing, HTTP endpoint, JSON log). The index and encoder tests load the real test artifact.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import urllib.request
from contextlib import contextmanager

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from semsearch.v1 import (encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2,
                          index_pb2_grpc)
from services.common import metrics
from services.common import server as common
from services.common.wait_ready import wait_serving
from services.encoder import server as encoder_server
from services.index import server as index_server

GATEWAY = "semsearch.v1.Gateway"
VERSION = "fake-version"


class FakeEncoder(encoder_pb2_grpc.EncoderServicer):
    def EncodeText(self, request, context):
        return encoder_pb2.EncodeTextResponse(vector=encoder_pb2.Vector(values=[1.0, 0.0]), artifact_version=VERSION)


class FakeIndex(index_pb2_grpc.IndexServicer):
    def Search(self, request, context):
        return index_pb2.IndexSearchResponse(neighbors=[index_pb2.Neighbor(id="kitten", score=0.9)],
                                             artifact_version=VERSION)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


REFLECTION = dict(grpc_service="grpc.reflection.v1alpha.ServerReflection", grpc_method="ServerReflectionInfo")


def reflection_calls(samples) -> float:
    """Reflection streams finished: OK, or CANCELLED when the client closed its channel first."""
    return sum(value(samples, "grpc_server_handled_total", **REFLECTION, grpc_code=code) or 0
               for code in ("OK", "CANCELLED"))


def scrape_until(port: int, done, timeout: float = 30.0):
    """Scrape until `done(samples)`: for what a server thread records after the client has its answer."""
    deadline = time.monotonic() + timeout
    while not done(samples := scrape(port)):
        assert time.monotonic() < deadline, "the metrics never showed it"
        time.sleep(0.01)
    return samples


@pytest.fixture()
def fake_downstream():
    """A fake encoder and a fake index, each SERVING on its own loopback port."""

    @contextmanager
    def serving(add):
        def start(server):
            add(server)
            return []
        with common.grpc_server(0, start) as (_, port, health_servicer):
            common.set_serving(health_servicer, [], True)
            yield f"127.0.0.1:{port}"

    with serving(lambda s: encoder_pb2_grpc.add_EncoderServicer_to_server(FakeEncoder(), s)) as encoder, \
            serving(lambda s: index_pb2_grpc.add_IndexServicer_to_server(FakeIndex(), s)) as index:
        yield encoder, index


@pytest.fixture()
def request_lines():
    """What the request logger writes, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(metrics.JsonFormatter())
    logger = logging.getLogger(metrics.REQUEST_LOGGER)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_gateway_counts_times_and_logs_every_call(fake_downstream, request_lines):
    from services.gateway import server as gateway_server

    encoder, index = fake_downstream
    telemetry = metrics.Telemetry("gateway", metrics_port=0, log_format="json")
    with gateway_server.run_server(0, encoder, index, telemetry=telemetry) as (_, port):
        wait_serving(f"127.0.0.1:{port}", timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            assert stub.Search(gateway_pb2.SearchRequest(text="cat", k=3), timeout=10).results[0].id == "kitten"
            assert stub.SimilarWords(gateway_pb2.SimilarWordsRequest(word="cat", k=3), timeout=10).words
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(gateway_pb2.SearchRequest(text="cat", k=0), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a streaming call (server reflection: a request stream and a response stream)
            assert GATEWAY in set(ProtoReflectionDescriptorDatabase(channel).get_services())
        # the reflection stream ends when its channel closes, on a server thread: wait until it is counted
        samples = scrape_until(telemetry.port, lambda found: reflection_calls(found) == 1)
        lines = request_lines()

    handled = "grpc_server_handled_total"
    assert value(samples, handled, grpc_service=GATEWAY, grpc_method="Search", grpc_code="OK") == 1
    assert value(samples, handled, grpc_service=GATEWAY, grpc_method="Search", grpc_code="INVALID_ARGUMENT") == 1
    assert value(samples, handled, grpc_service=GATEWAY, grpc_method="SimilarWords", grpc_code="OK") == 1
    assert value(samples, "grpc_server_handling_seconds_count", grpc_service=GATEWAY, grpc_method="Search") == 2
    assert value(samples, "grpc_server_handling_seconds_bucket", grpc_service=GATEWAY, grpc_method="Search",
                 le="+Inf") == 2
    assert value(samples, "grpc_server_in_flight", grpc_service=GATEWAY, grpc_method="Search") == 0
    assert value(samples, "grpc_server_in_flight", **REFLECTION) == 0
    # the hops: one text encoding, two index searches (the refused call reached neither)
    assert value(samples, "semsearch_downstream_seconds_count", hop="encoder", grpc_method="EncodeText",
                 grpc_code="OK") == 1
    assert value(samples, "semsearch_downstream_seconds_count", hop="index", grpc_method="Search",
                 grpc_code="OK") == 2
    # one JSON line per call, health checks included; ours in order
    calls = [line for line in lines if line["method"].startswith(f"/{GATEWAY}/")]
    assert [(c["method"], c["status"]) for c in calls] == [
        (f"/{GATEWAY}/Search", "OK"), (f"/{GATEWAY}/SimilarWords", "OK"), (f"/{GATEWAY}/Search", "INVALID_ARGUMENT")]
    assert all(c["duration_ms"] >= 0 and c["trace_id"] is None and c["service"] == "gateway" for c in calls)


def test_metrics_and_request_logs_are_off_unless_asked(monkeypatch):
    from services.web import server as web_server

    monkeypatch.delenv("METRICS_PORT", raising=False)
    telemetry = metrics.Telemetry("gateway")
    assert telemetry.interceptors() == [] and telemetry.channel_interceptors("index") == []
    args = metrics.telemetry_from_args(_parse(["--log-format", "json"]), "gateway")
    assert args.metrics_port is None and [type(i) for i in args.interceptors()] == [metrics.RequestObserver]
    assert metrics.telemetry_from_args(_parse(["--metrics-port", "9464"]), "gateway").metrics_port == 9464
    assert web_server.build_parser().parse_args([]).metrics_port == 0  # the web service's: off
    assert web_server.build_parser().parse_args(["--metrics-port", "9467"]).metrics_port == 9467


def _parse(argv):
    from services.gateway import server as gateway_server
    return gateway_server.build_parser().parse_args(argv)


def test_index_and_encoder_show_calls_vectors_and_their_artifact_version(artifact_root, cifar):
    index_telemetry = metrics.Telemetry("index", metrics_port=0)
    encoder_telemetry = metrics.Telemetry("encoder", metrics_port=0)
    with index_server.run_server(0, str(artifact_root), reload_seconds=0, telemetry=index_telemetry) as (_, index), \
            encoder_server.run_server(0, str(artifact_root), reload_seconds=0,
                                      telemetry=encoder_telemetry) as (_, encoder):
        wait_serving(f"127.0.0.1:{index}")
        wait_serving(f"127.0.0.1:{encoder}")
        with grpc.insecure_channel(f"127.0.0.1:{index}") as channel:
            stub = index_pb2_grpc.IndexStub(channel)
            found = stub.Search(index_pb2.IndexSearchRequest(index="words", k=3, id="cat"), timeout=30)
            assert found.neighbors
            version = found.artifact_version  # the version the index says it serves
            assert version
            with pytest.raises(grpc.RpcError) as missing:
                stub.Search(index_pb2.IndexSearchRequest(index="no-such-index", k=3, id="cat"), timeout=30)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        image = sorted((cifar / "train" / "bird").glob("*.jpg"))[0]
        with grpc.insecure_channel(f"127.0.0.1:{encoder}") as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            encoded = stub.EncodeText(encoder_pb2.EncodeTextRequest(text="cat"), timeout=30)
            assert encoded.vector.values
            encoded_version = encoded.artifact_version
            stub.EncodeImages(encoder_pb2.EncodeImagesRequest(images=[image.read_bytes()] * 2), timeout=60)
        index_samples, encoder_samples = scrape(index_telemetry.port), scrape(encoder_telemetry.port)

    handled, service = "grpc_server_handled_total", "semsearch.v1.Index"
    assert value(index_samples, handled, grpc_service=service, grpc_method="Search", grpc_code="OK") == 1
    assert value(index_samples, handled, grpc_service=service, grpc_method="Search", grpc_code="NOT_FOUND") == 1
    assert value(index_samples, "grpc_server_handling_seconds_count", grpc_service=service, grpc_method="Search") == 2
    assert value(index_samples, "grpc_server_in_flight", grpc_service=service, grpc_method="Search") == 0
    assert value(index_samples, "semsearch_index_vectors", index="words") > 1000
    assert value(index_samples, "semsearch_artifact_info", service="index", version=version) == 1
    assert value(index_samples, "semsearch_artifact_reloads_total") == 0
    assert value(index_samples, "semsearch_artifact_load_failures_total") == 0
    assert value(index_samples, "semsearch_index_live_added_total") == 0

    assert value(encoder_samples, "semsearch_artifact_info", service="encoder", version=encoded_version) == 1
    assert encoded_version == version
    assert value(encoder_samples, handled, grpc_service="semsearch.v1.Encoder", grpc_method="EncodeText",
                 grpc_code="OK") == 1
    assert value(encoder_samples, "semsearch_encoder_images_per_call_count") == 1
    assert value(encoder_samples, "semsearch_encoder_images_per_call_sum") == 2
    assert value(encoder_samples, "semsearch_encoder_image_seconds_count") == 1


def test_artifact_switches_and_failed_loads_are_counted(tmp_path):
    """Through `follow_artifacts` with stand-in cores (as in test_switch): the first load is no reload,
    a version that fails twice counts two failures, then its switch counts one reload."""
    from tests.test_switch import Core, publish

    publish(tmp_path, "v1")
    attempts: dict[str, int] = {}
    switched = threading.Event()

    def load(directory):
        attempts[directory.name] = attempts.get(directory.name, 0) + 1
        if directory.name == "v2" and attempts["v2"] < 3:
            raise OSError("the shared volume is not there yet")
        core = Core(directory.name)
        if directory.name == "v2":
            switched.set()
        return core

    telemetry = metrics.Telemetry("encoder")
    loading, stop, ready = common.Loading("encoder", telemetry), threading.Event(), threading.Event()
    follower = threading.Thread(target=common.follow_artifacts,
                                args=(loading, tmp_path, load, ready.set, None, 0.01, stop))
    follower.start()
    try:
        assert ready.wait(30)
        sample = telemetry.registry.get_sample_value
        assert sample("semsearch_artifact_info", {"service": "encoder", "version": "v1"}) == 1
        assert sample("semsearch_artifact_reloads_total") == 0
        publish(tmp_path, "v2")
        assert switched.wait(60)
    finally:
        stop.set()
        follower.join()
    assert loading.core.version == "v2"
    assert sample("semsearch_artifact_info", {"service": "encoder", "version": "v2"}) == 1
    assert sample("semsearch_artifact_info", {"service": "encoder", "version": "v1"}) is None
    assert sample("semsearch_artifact_reloads_total") == 1
    assert sample("semsearch_artifact_load_failures_total") == 2


def test_web_counts_requests_by_route_template_and_status(services, tmp_path):
    """The web service over the real gateway, with its metrics on a port of its own."""
    from urllib.parse import quote

    from services.web import server as web_server
    from services.web.app import MAX_UPLOAD_BYTES
    from services.web.metrics import WebMetrics
    from tests.test_web import declared_only, request

    web_metrics = WebMetrics(metrics_port=0)
    with web_server.run_server(0, services.gateway, thumbnails=tmp_path, metrics=web_metrics) as (_, port):
        base = f"http://127.0.0.1:{port}"
        hit = request(base, "GET", "/api/search?q=cat&k=2").json()["results"][0]
        assert request(base, "GET", "/api/search?q=qqxzvw").status == 404  # a word not in the vocabulary
        assert request(base, "GET", "/api/search").status == 400  # no q
        assert request(base, "GET", "/api/images/" + quote(hit["id"]) + "/thumbnail").status == 200
        assert request(base, "GET", "/no/such/page/1").status == 404
        assert request(base, "GET", "/no/such/page/2").status == 404
        assert declared_only(base, MAX_UPLOAD_BYTES + 1, "image/jpeg").status == 413
        samples = scrape(web_metrics.port)
    assert web_metrics.port != port

    def requests(route, status, method="GET"):
        return value(samples, "http_server_requests_total", route=route, method=method, status=status)

    assert requests("/api/search", "200") == requests("/api/search", "404") == requests("/api/search", "400") == 1
    assert requests("/api/images/{image_id:path}/thumbnail", "200") == 1
    # paths no route serves, and bodies refused before routing, share one series: no series per URL
    assert requests("unmatched", "404") == 2 and requests("unmatched", "413", "POST") == 1
    assert value(samples, "http_server_request_duration_seconds_count", route="/api/search", method="GET") == 3
    assert value(samples, "http_server_request_duration_seconds_bucket", route="/api/search", method="GET",
                 le="+Inf") == 3
    assert value(samples, "http_server_in_flight") == 0



def test_a_repeated_text_query_skips_the_encoder(fake_downstream):
    """The gateway keeps text queries' vectors by query and version: the second `cat` calls only the index."""
    from services.gateway import server as gateway_server

    encoder, index = fake_downstream
    telemetry = metrics.Telemetry("gateway", metrics_port=0)
    with gateway_server.run_server(0, encoder, index, telemetry=telemetry) as (_, port):
        wait_serving(f"127.0.0.1:{port}", timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            answers = [stub.Search(gateway_pb2.SearchRequest(text=text, k=3), timeout=10)
                       for text in ("cat", "dog", "cat")]
        samples = scrape(telemetry.port)
    assert answers[0] == answers[2]
    assert value(samples, "semsearch_downstream_seconds_count", hop="encoder", grpc_method="EncodeText",
                 grpc_code="OK") == 2
    assert value(samples, "semsearch_downstream_seconds_count", hop="index", grpc_method="Search",
                 grpc_code="OK") == 3
    assert value(samples, "semsearch_text_cache_lookups_total", result="hit") == 1
    assert value(samples, "semsearch_text_cache_lookups_total", result="miss") == 2


def test_downstream_stub_times_blocking_failed_and_future_calls(fake_downstream):
    """The gateway's stub for a hop (plumbing: the fake index) times every unary call by method and status,
    futures (the shard fan-out's) when they finish; with metrics off the stub is left as it was."""
    _, index = fake_downstream
    telemetry = metrics.Telemetry("gateway", metrics_port=0)  # on (its HTTP endpoint is not started here)
    histogram = telemetry.downstream
    service = index_pb2.DESCRIPTOR.services_by_name["Index"]
    with grpc.insecure_channel(index) as channel:
        plain = index_pb2_grpc.IndexStub(channel)
        assert metrics.Telemetry("gateway").downstream_stub(plain, service, "index") is plain
        stub = telemetry.downstream_stub(index_pb2_grpc.IndexStub(channel), service, "index-shard-0")
        search = index_pb2.IndexSearchRequest(index="images", k=1)
        assert stub.Search(search, timeout=10).neighbors[0].id == "kitten"
        assert stub.Search.future(search, timeout=10).result().neighbors[0].id == "kitten"
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetVectors(index_pb2.GetVectorsRequest(index="images", ids=["x"]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the fake index has no GetVectors

    def count(method: str, code: str) -> float:
        return metrics_registry_value(histogram, hop="index-shard-0", grpc_method=method, grpc_code=code)

    deadline = time.monotonic() + 30
    while count("Search", "OK") < 2:  # the future's callback runs on gRPC's thread after result()
        assert time.monotonic() < deadline, "the future's call was never timed"
        time.sleep(0.01)
    assert count("GetVectors", "UNIMPLEMENTED") == 1


def metrics_registry_value(histogram, **labels) -> float:
    """A histogram child's observation count (0 before its first)."""
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels == labels:
                return sample.value
    return 0
