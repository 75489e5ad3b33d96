"""Bounded work per server: idle streams cannot stall a service, overload is refused at once,
reflection can be turned off."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import server as common
from services.common.limits import CallLimits, Limits
from services.common.wait_ready import wait_serving
from services.gateway import server as gateway_server

IDLE_STREAMS = 100


def idle_requests(release: threading.Event):
    """A request stream that sends nothing until `release` is set: an idle client."""
    release.wait()
    yield from ()


@pytest.mark.parametrize("kind", ["reflection", "health watch"])
def test_idle_streams_cannot_stall_search(services, kind):
    release = threading.Event()
    with grpc.insecure_channel(services.gateway) as channel:
        ended = threading.Semaphore(0)
        if kind == "reflection":
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            streams = [stub.ServerReflectionInfo(idle_requests(release)) for _ in range(IDLE_STREAMS)]
        else:  # a watch sends one status, then idles until the status changes
            watch = health_pb2_grpc.HealthStub(channel).Watch
            streams = [watch(health_pb2.HealthCheckRequest()) for _ in range(IDLE_STREAMS)]
        for stream in streams:
            stream.add_done_callback(lambda _call: ended.release())
        try:
            answer = gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(text="dog", k=5),
                                                                  timeout=30)
            assert len(answer.results) == 5
            # the streams beyond the allowance were refused at once, not parked on a worker thread
            for _ in range(IDLE_STREAMS - Limits().max_streams):
                assert ended.acquire(timeout=60)
            codes = [s.code() for s in streams if not s.is_active()]
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (IDLE_STREAMS - Limits().max_streams)
        finally:
            release.set()
            for stream in streams:
                stream.cancel()


class Blocking(grpc.GenericRpcHandler):
    """Plumbing fake: one unary method that holds its worker until released (the test is about the
    server's limits, not about any service's work)."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def service(self, handler_call_details):
        if handler_call_details.method != "/test.Blocking/Hold":
            return None

        def hold(request: bytes, context) -> bytes:
            self.entered.release()
            self.release.wait()
            return request

        return grpc.unary_unary_rpc_method_handler(hold)


def test_calls_beyond_the_limit_are_refused_at_once():
    blocking = Blocking()

    def add(server: grpc.Server) -> list[str]:
        server.add_generic_rpc_handlers((blocking,))
        return []

    with common.grpc_server(0, add, limits=Limits(max_calls=2, max_streams=1)) as (_, port, health_servicer), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel, futures.ThreadPoolExecutor(2) as pool:
        common.set_serving(health_servicer, [], True)
        hold = channel.unary_unary("/test.Blocking/Hold")
        held = [pool.submit(hold, b"x", timeout=60) for _ in range(2)]
        for _ in held:
            assert blocking.entered.acquire(timeout=60)
        with pytest.raises(grpc.RpcError) as error:
            hold(b"y", timeout=60)  # would wait for the release (60 s) if it were queued
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_serving(f"127.0.0.1:{port}", timeout=30)  # health is exempt: probes answer under load
        blocking.release.set()
        assert [f.result() for f in held] == [b"x", b"x"]
        assert hold(b"z", timeout=60) == b"z"  # the slots came back


def test_reflection_can_be_turned_off(services):
    with gateway_server.run_server(0, services.encoder, services.index, limits=Limits(reflection=False)) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        wait_serving(f"127.0.0.1:{port}", timeout=60)
        answer = gateway_pb2_grpc.GatewayStub(channel).SimilarWords(gateway_pb2.SimilarWordsRequest(word="cat", k=3),
                                                                    timeout=30)
        assert len(answer.words) == 3


def test_the_limit_flags_parse():
    args = gateway_server.build_parser().parse_args(["--max-calls", "8", "--max-streams", "2", "--no-reflection"])
    from services.common.limits import limits_from_args
    assert limits_from_args(args) == Limits(max_calls=8, max_streams=2, reflection=False)


class PastDeadline:
    """Plumbing stand-in for a ServicerContext whose deadline has passed while the call waited."""

    def time_remaining(self) -> float:
        return 0.0

    def abort(self, code, details):
        raise grpc.RpcError(code, details)


def test_a_call_past_its_deadline_is_dropped_not_run():
    ran = []
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: ran.append(request) or b"")
    details = type("Details", (), {"method": "/semsearch.v1.Gateway/Search"})()
    limited = CallLimits(Limits()).intercept_service(lambda _: handler, details)
    with pytest.raises(grpc.RpcError) as error:
        limited.unary_unary(b"request", PastDeadline())
    assert error.value.args[0] == grpc.StatusCode.DEADLINE_EXCEEDED and ran == []
