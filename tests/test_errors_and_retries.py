"""What outside callers see and what the gateway sends downstream when things go wrong: bounded
retries, no internal addresses or paths, client strings cut short, label quota."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from semsearch.v1 import encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import bounds, ids
from services.common import server as common
from services.gateway import downstream as gateway_downstream
from services.gateway import server as gateway_server


class RefusingEncoder(encoder_pb2_grpc.EncoderServicer):
    """Plumbing fake: an encoder that refuses every call with `code`, counting them (the test is about
    how many calls the gateway makes, not about encoding)."""

    def __init__(self, code: grpc.StatusCode):
        self.code, self.calls, self.lock = code, 0, threading.Lock()

    def EncodeText(self, request, context):
        with self.lock:
            self.calls += 1
            number = self.calls
        if self.code == grpc.StatusCode.FAILED_PRECONDITION:  # always mid-switch, to a newer version each time
            context.set_trailing_metadata(((common.VERSION_METADATA, f"v{number}"),))
        context.abort(self.code, "refused by the fake encoder at 10.1.2.3:50051 (/srv/artifacts/v1)")


@pytest.fixture
def refusing(request):
    encoder = RefusingEncoder(request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    encoder_pb2_grpc.add_EncoderServicer_to_server(encoder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield encoder, f"127.0.0.1:{port}"
    server.stop(0)


def search_status(gateway: str, text: str = "dog") -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(gateway) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(text=text, k=3), timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("refusing, most", [
    (grpc.StatusCode.UNAVAILABLE, gateway_downstream.RETRY_ATTEMPTS),  # before: 3
    (grpc.StatusCode.FAILED_PRECONDITION, gateway_server.VERSION_ATTEMPTS),  # before: 6 (x3 with UNAVAILABLE)
], indirect=["refusing"])
def test_a_failing_downstream_gets_a_bounded_number_of_calls(services, refusing, most):
    encoder, address = refusing
    with gateway_server.run_server(0, address, services.index) as (_, port):
        code, details = search_status(f"127.0.0.1:{port}")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert 1 <= encoder.calls <= most
    assert "10.1.2.3" not in details and "/srv" not in details and address not in details


def test_a_down_downstream_is_named_without_its_address(services):
    with gateway_server.run_server(0, "127.0.0.1:1", services.index, timeout=2) as (_, port):
        code, details = search_status(f"127.0.0.1:{port}")
    assert code == grpc.StatusCode.UNAVAILABLE and "encoder" in details and "127.0.0.1" not in details


@pytest.mark.parametrize("call", ["similar", "search", "words", "delete"])
def test_client_strings_come_back_cut_short(services, call):
    long = "x" * 100_000
    with grpc.insecure_channel(services.gateway) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        requests = {
            "similar": (gateway.SimilarImages, gateway_pb2.SimilarImagesRequest(id=long, k=3)),
            "search": (gateway.Search, gateway_pb2.SearchRequest(text="cat " + "qqzz" * 200, k=3)),
            "words": (gateway.SimilarWords, gateway_pb2.SimilarWordsRequest(word=long, k=3)),
            "delete": (gateway.DeleteImages, gateway_pb2.DeleteImagesRequest(ids=[long] * 20)),
        }
        method, request = requests[call]
        with pytest.raises(grpc.RpcError) as error:
            method(request, timeout=30)
    assert error.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert len(error.value.details()) < 1000


def test_labels_have_a_length_limit(services):
    image = b"\x89PNG not really"  # refused for its label before anything is decoded or stored
    label = "l" * (bounds.MAX_LABEL_CHARS + 1)
    with grpc.insecure_channel(services.gateway) as channel:
        with pytest.raises(grpc.RpcError) as error:
            gateway_pb2_grpc.GatewayStub(channel).AddImages(gateway_pb2.AddImagesRequest(
                images=[gateway_pb2.ImageToAdd(image=image, label=label)]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "label" in error.value.details()
    with grpc.insecure_channel(services.index) as channel:
        with pytest.raises(grpc.RpcError) as error:
            index_pb2_grpc.IndexStub(channel).AddImages(index_pb2.IndexAddImagesRequest(images=[index_pb2.NewImage(
                id=ids.image_id(image), image=image, label=label, vector=index_pb2.FloatVector(values=[1.0] * 50))]),
                timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "label" in error.value.details()
