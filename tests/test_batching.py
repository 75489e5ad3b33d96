"""Searches that arrive together go downstream together (services/gateway/batching.py).

The Coalescer tests are plumbing: their `send` is a stand-in that records its batches and waits for the
test's signal. The gateway test is behaviour, on the real services: concurrent searches answer exactly
as the same searches one at a time, and some of them went downstream in SearchMany calls.
"""

import threading
from concurrent import futures

import grpc
import pytest

from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import metrics
from services.gateway import server as gateway_server
from services.gateway.batching import Coalescer
from tests.conftest import wait_serving
from tests.test_metrics import scrape, value

WORDS = ["dog", "cat", "ship", "truck", "bird", "frog", "horse", "deer", "airplane", "automobile", "ocean", "sky"]


class HeldSend:
    """A stand-in `send`: records each batch; the first call waits until `release` is set."""

    def __init__(self, fail: bool = False):
        self.batches: list[list] = []
        self.first_started, self.release = threading.Event(), threading.Event()
        self.fail = fail

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        if len(self.batches) == 1:
            self.first_started.set()
            self.release.wait(timeout=30)
        if self.fail:
            raise ValueError(f"refused {items}")
        return [f"{key}:{item}" for item in items]


def waiting(coalescer: Coalescer, key, count: int) -> None:
    """Until `count` searches of `key` wait for a slot."""
    while True:
        with coalescer._lock:
            kind = coalescer._kinds.get(key)
            if kind is not None and len(kind.waiting) == count:
                return
        threading.Event().wait(0.001)


def test_a_search_that_finds_a_free_slot_goes_at_once_alone():
    send = HeldSend()
    send.release.set()
    coalescer = Coalescer(send, max_in_flight=1)
    assert [coalescer.submit("k", n) for n in range(3)] == ["k:0", "k:1", "k:2"]
    assert send.batches == [("k", [0]), ("k", [1]), ("k", [2])]


def test_searches_that_wait_go_together_and_each_gets_its_own_answer():
    send = HeldSend()
    coalescer = Coalescer(send, max_in_flight=1, max_batch=4)
    with futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(coalescer.submit, "k", "first")
        assert send.first_started.wait(timeout=30)
        rest = [pool.submit(coalescer.submit, "k", n) for n in range(6)]
        other_key = pool.submit(coalescer.submit, "other", "x")  # its own slot: does not wait behind "k"
        assert other_key.result(timeout=30) == "other:x"
        waiting(coalescer, "k", 6)
        send.release.set()
        assert first.result(timeout=30) == "k:first"
        assert [r.result(timeout=30) for r in rest] == [f"k:{n}" for n in range(6)]
    sizes = [len(items) for key, items in send.batches if key == "k"]
    assert sizes[0] == 1 and sum(sizes) == 7 and max(sizes) <= 4 and len(sizes) == 3  # 1, then 4 + 2
    assert coalescer._kinds == {}  # every slot given back


def test_a_failed_call_fails_each_of_its_searches_and_the_slot_comes_back():
    send = HeldSend(fail=True)
    coalescer = Coalescer(send, max_in_flight=1)
    with futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(coalescer.submit, "k", 0)
        assert send.first_started.wait(timeout=30)
        rest = [pool.submit(coalescer.submit, "k", n) for n in (1, 2, 3)]
        waiting(coalescer, "k", 3)
        send.release.set()
        for call in [first, *rest]:
            with pytest.raises(ValueError, match="refused"):
                call.result(timeout=30)
    send.fail = False
    assert coalescer.submit("k", 4) == "k:4"
    assert coalescer._kinds == {}


def test_bad_settings_are_refused():
    for in_flight, batch in ((0, 8), (1, 0)):
        with pytest.raises(ValueError):
            Coalescer(HeldSend(), in_flight, batch)


@pytest.mark.slow
def test_concurrent_gateway_searches_answer_as_the_same_searches_one_at_a_time(services):
    """16 threads search at once through a gateway that batches; each answer equals the one a gateway
    that never batches gives to the same search, alone; its metrics count the calls and their searches."""
    telemetry = metrics.Telemetry("gateway", metrics_port=0)
    with gateway_server.run_server(0, services.encoder, services.index, telemetry=telemetry, search_calls=1) as (_, port), \
            gateway_server.run_server(0, services.encoder, services.index, search_calls=0) as (_, alone_port):
        for bound in (port, alone_port):
            wait_serving(f"127.0.0.1:{bound}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                grpc.insecure_channel(f"127.0.0.1:{alone_port}") as alone_channel:
            batching, alone = gateway_pb2_grpc.GatewayStub(channel), gateway_pb2_grpc.GatewayStub(alone_channel)
            queries = [(word, k) for word in WORDS for k in (5, 10)] * 4
            expected = {query: alone.Search(gateway_pb2.SearchRequest(text=query[0], k=query[1]), timeout=30)
                        for query in set(queries)}

            def search(query):
                return batching.Search(gateway_pb2.SearchRequest(text=query[0], k=query[1]), timeout=30)

            with futures.ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(search, queries))
        samples = scrape(telemetry.port)
    for query, answer in zip(queries, answers):
        assert answer == expected[query], query
    batched = value(samples, "semsearch_downstream_seconds_count", hop="index", grpc_method="SearchMany",
                    grpc_code="OK")
    alone_calls = value(samples, "semsearch_downstream_seconds_count", hop="index", grpc_method="Search",
                        grpc_code="OK") or 0
    assert batched and batched >= 1
    assert alone_calls + batched < len(queries)  # fewer index calls than searches
    # each search counted once, in the call that carried it
    assert value(samples, "semsearch_searches_per_call_sum") == len(queries)
    assert value(samples, "semsearch_searches_per_call_count") == alone_calls + batched
    assert value(samples, "semsearch_searches_per_call_bucket", le="1.0") == alone_calls


class Context:
    """A stand-in for a server call's context (plumbing): no deadline; abort raises with the status."""

    def time_remaining(self):
        return None

    def abort(self, code, details):
        raise Aborted(code, details)


class Aborted(Exception):
    pass


def test_a_batch_that_fails_names_its_process_and_each_caller_gets_our_status():
    """Nothing listens on the index's port: the batched call raises for every search in it, naming the index
    service, and each caller's context is aborted with UNAVAILABLE (no address in the message)."""
    from semsearch.v1 import index_pb2
    from services.gateway.downstream import Downstream

    downstream = Downstream("127.0.0.1:1", "127.0.0.1:1", timeout=5.0)
    try:
        request = index_pb2.IndexSearchRequest(index="images", k=3, vector=index_pb2.FloatVector(values=[1.0, 0.0]))
        with pytest.raises(grpc.RpcError) as failed:
            downstream._search_many((3, ""), [(request, Context()), (request, Context())])
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.downstream == "the index service"
        with pytest.raises(Aborted) as aborted:
            downstream.search_images(request, Context())
        assert aborted.value.args == (grpc.StatusCode.UNAVAILABLE, "the index service is unavailable (UNAVAILABLE)")
        assert downstream.plain_searches._kinds == {}  # the slot came back
    finally:
        downstream.close()
