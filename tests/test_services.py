"""The three gRPC services on loopback: health, reflection, info, status codes; gateway plumbing."""

import io
import math
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.gateway import server as gateway_server
from services.index import server as index_server
from tests.conftest import wait_serving
from tests.helpers import status_of


@pytest.fixture(scope="module")
def stubs(services):
    channels = [grpc.insecure_channel(a) for a in (services.gateway, services.encoder, services.index)]
    yield (gateway_pb2_grpc.GatewayStub(channels[0]), encoder_pb2_grpc.EncoderStub(channels[1]),
           index_pb2_grpc.IndexStub(channels[2]))
    for channel in channels:
        channel.close()


@pytest.mark.parametrize("name, service", [("gateway", "semsearch.v1.Gateway"), ("encoder", "semsearch.v1.Encoder"),
                                           ("index", "semsearch.v1.Index")])
def test_health_and_reflection(services, name, service):
    address = getattr(services, name)
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for checked in ("", service):
            assert health.Check(health_pb2.HealthCheckRequest(service=checked)).status == health_pb2.HealthCheckResponse.SERVING
        listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


def test_info(stubs):
    _, encoder, index = stubs
    info = encoder.Info(encoder_pb2.EncoderInfoRequest())
    assert (info.dimension, info.backbone, info.vocabulary_size) == (50, "efficientnet-lite0", 400_000)
    sizes = {i.name: (i.size, i.dimension) for i in index.Info(index_pb2.IndexInfoRequest()).indexes}
    assert sizes == {"images": (1000, 50), "words": (400_000, 50)}
    assert index.Info(index_pb2.IndexInfoRequest()).artifact_version == info.artifact_version


def test_gateway_search_is_encoder_then_index(stubs):
    gateway, encoder, index = stubs
    vector = encoder.EncodeText(encoder_pb2.EncodeTextRequest(text="dog")).vector
    assert math.isclose(np.linalg.norm(vector.values), 1.0, rel_tol=1e-5) and len(vector.values) == 50
    direct = index.Search(index_pb2.IndexSearchRequest(index="images", vector=index_pb2.FloatVector(values=vector.values), k=7))
    through = gateway.Search(gateway_pb2.SearchRequest(text="dog", k=7))
    assert [(r.id, r.path, r.label) for r in through.results] == [(n.id, n.path, n.label) for n in direct.neighbors]
    np.testing.assert_allclose([r.score for r in through.results], [n.score for n in direct.neighbors], rtol=1e-6)


def test_tag_mode_is_chosen_per_request(stubs, cifar):
    gateway, encoder, _ = stubs
    info = encoder.Info(encoder_pb2.EncoderInfoRequest())
    assert list(info.modes) == ["devise", "conse", "hybrid", "gated"] and info.default_mode in info.modes
    photo = (cifar / "test" / "cat" / "0001.jpg").read_bytes()
    tags = {mode: [w.word for w in gateway.Tag(gateway_pb2.TagRequest(image=photo, k=10, mode=mode)).words]
            for mode in info.modes}
    assert tags[info.default_mode] == [w.word for w in gateway.Tag(gateway_pb2.TagRequest(image=photo, k=10)).words]
    assert tags["conse"] != tags["devise"]  # no head at all: the ImageNet classifier's own view
    vectors = {mode: encoder.EncodeImage(encoder_pb2.EncodeImageRequest(image=photo, mode=mode)).values
               for mode in info.modes}
    assert all(math.isclose(np.linalg.norm(v), 1.0, rel_tol=1e-4) for v in vectors.values())


def test_batched_image_encoding_matches_single(stubs, cifar):
    _, encoder, _ = stubs
    photos = [p.read_bytes() for p in sorted((cifar / "test" / "frog").iterdir())[:3]]
    batched = encoder.EncodeImages(encoder_pb2.EncodeImagesRequest(images=photos)).vectors
    for photo, vector in zip(photos, batched):
        single = encoder.EncodeImage(encoder_pb2.EncodeImageRequest(image=photo))
        np.testing.assert_allclose(single.values, vector.values, atol=1e-5)


OK, BAD, MISSING, TOO_BIG = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                             grpc.StatusCode.RESOURCE_EXHAUSTED)

def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()[:300]


TRUNCATED_JPEG = _truncated_jpeg()

BAD_REQUESTS = [
    ("gateway", "Search", gateway_pb2.SearchRequest(text="", k=5), BAD, "empty"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="   ", k=5), BAD, "empty"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="qqzzyx", k=5), MISSING, "qqzzyx"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog qqzzyx blorfz", k=5), MISSING, "qqzzyx, blorfz"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog", k=0), BAD, "k must be"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog", k=-3), BAD, "k must be"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog", k=1001), BAD, "k must be"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog", k=5, min_score=1.5), BAD, "min_score"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog", k=5, min_score=float("nan")), BAD, "min_score"),
    ("gateway", "Search", gateway_pb2.SearchRequest(k=5), BAD, "needs a query"),
    ("gateway", "Search", gateway_pb2.SearchRequest(text="dog " * 400, k=5), BAD, "limit"),
    ("gateway", "Search", gateway_pb2.SearchRequest(image=b"", k=5), BAD, "empty"),
    ("gateway", "Tag", gateway_pb2.TagRequest(image=TRUNCATED_JPEG, k=5), BAD, "cannot be decoded"),
    ("gateway", "Tag", gateway_pb2.TagRequest(image=b"plain text", k=5), BAD, "not an image"),
    ("gateway", "Tag", gateway_pb2.TagRequest(image=b"plain text", k=5, mode="magic"), BAD, "unknown mode 'magic'"),
    ("gateway", "SimilarImages", gateway_pb2.SimilarImagesRequest(id="no/such.jpg", k=5), MISSING, "no/such.jpg"),
    ("gateway", "SimilarWords", gateway_pb2.SimilarWordsRequest(word="qqzzyx", k=5), MISSING, "qqzzyx"),
    ("gateway", "SimilarWords", gateway_pb2.SimilarWordsRequest(word=" ", k=5), BAD, "needs a word"),
    ("gateway", "AddImages", gateway_pb2.AddImagesRequest(), BAD, "at least one image"),
    ("gateway", "AddImages", gateway_pb2.AddImagesRequest(images=[gateway_pb2.ImageToAdd(image=b"x")] * 65), TOO_BIG,
     "limit is 64"),
    ("gateway", "AddImages", gateway_pb2.AddImagesRequest(images=[gateway_pb2.ImageToAdd(image=b"plain text")]), BAD,
     "not an image"),
    ("gateway", "AddImages", gateway_pb2.AddImagesRequest(images=[gateway_pb2.ImageToAdd(image=b"x", id="../out.jpg")]),
     BAD, "relative path"),
    ("gateway", "AddImages", gateway_pb2.AddImagesRequest(images=[gateway_pb2.ImageToAdd(image=b"x", id="added/123")]),
     BAD, "content ids"),
    ("gateway", "ListImages", gateway_pb2.ListImagesRequest(limit=1001), BAD, "limit must be"),
    ("index", "ListItems", index_pb2.ListItemsRequest(index="images"), BAD, "limit must be"),
    ("index", "ListItems", index_pb2.ListItemsRequest(index="faces", limit=5), MISSING, "no index named 'faces'"),
    ("gateway", "DeleteImages", gateway_pb2.DeleteImagesRequest(), BAD, "at least one id"),
    ("gateway", "DeleteImages", gateway_pb2.DeleteImagesRequest(ids=["ship/0000.jpg", "no/such.jpg"]), MISSING,
     "'no/such.jpg'"),
    ("encoder", "EncodeImages", encoder_pb2.EncodeImagesRequest(images=[b"x"] * 65), TOO_BIG, "limit is 64"),
    ("index", "Search", index_pb2.IndexSearchRequest(index="faces", id="x", k=5), MISSING, "no index named 'faces'"),
    ("index", "Search", index_pb2.IndexSearchRequest(index="images", vector=index_pb2.FloatVector(values=[1.0] * 49), k=5),
     BAD, "dimension 49"),
    ("index", "Search", index_pb2.IndexSearchRequest(index="images", vector=index_pb2.FloatVector(values=[math.nan] * 50), k=5),
     BAD, "NaN"),
    ("index", "AddImages", index_pb2.IndexAddImagesRequest(images=[index_pb2.NewImage(
        id="added/../../outside", image=b"x", vector=index_pb2.FloatVector(values=[1.0] * 50))]), BAD, "content id"),
    ("index", "DeleteImages", index_pb2.IndexDeleteImagesRequest(ids=["no/such.jpg"]), MISSING, "nothing deleted"),
]


@pytest.mark.parametrize("service, method, request_, code, words", BAD_REQUESTS,
                         ids=[f"{s}.{m}-{w}" for s, m, _, _, w in BAD_REQUESTS])
def test_bad_input_gets_a_clear_status_and_the_server_stays_healthy(stubs, services, service, method, request_, code, words):
    stub = dict(zip(("gateway", "encoder", "index"), stubs))[service]
    got, details = status_of(getattr(stub, method), request_)
    assert got == code and words in details
    wait_serving(getattr(services, service), timeout=5)


def test_similar_by_id_leaves_the_query_out(stubs):
    gateway, _, _ = stubs
    results = gateway.SimilarImages(gateway_pb2.SimilarImagesRequest(id="ship/0000.jpg", k=5)).results
    assert len(results) == 5 and "ship/0000.jpg" not in [r.id for r in results]


def test_get_image_says_where_an_indexed_image_is(stubs, cifar):
    gateway, _, _ = stubs
    image = gateway.GetImage(gateway_pb2.GetImageRequest(id="ship/0000.jpg"))
    assert (image.id, image.label, image.path) == ("ship/0000.jpg", "ship", str(cifar / "train" / "ship" / "0000.jpg"))
    assert status_of(gateway.GetImage, gateway_pb2.GetImageRequest(id="ship/nope.jpg"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_of(gateway.GetImage, gateway_pb2.GetImageRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT


class SlowEncoder(encoder_pb2_grpc.EncoderServicer):
    """A fake encoder that never answers in time (plumbing: deadlines and error mapping)."""

    def EncodeText(self, request, context):
        time.sleep(5)
        return encoder_pb2.EncodeTextResponse()


def test_gateway_answers_unavailable_within_its_deadline_when_downstream_is_slow_or_down(services):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    encoder_pb2_grpc.add_EncoderServicer_to_server(SlowEncoder(), server)
    slow_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for encoder_address in (f"127.0.0.1:{slow_port}", "127.0.0.1:1"):
            with gateway_server.run_server(0, encoder_address, services.index, timeout=0.5) as (_, port), \
                    grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                started = time.monotonic()
                code, details = status_of(gateway_pb2_grpc.GatewayStub(channel).Search,
                                          gateway_pb2.SearchRequest(text="dog", k=3))
                assert code == grpc.StatusCode.UNAVAILABLE and "encoder" in details
                assert time.monotonic() - started < 3
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                if encoder_address.endswith(":1"):
                    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)


def test_a_service_whose_artifact_fails_to_load_says_so(tmp_path):
    failures = []
    with index_server.run_server(0, str(tmp_path / "no-artifact"), on_load_failure=failures.append) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures and "make batch-train" in str(failures[0])
        code, details = status_of(index_pb2_grpc.IndexStub(channel).Info, index_pb2.IndexInfoRequest())
        assert code == grpc.StatusCode.UNAVAILABLE and "failed to load" in details
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
