"""Index shards behind the gateway (fan-out and merge) and encoder replicas (round robin, failover)."""

import threading
import time
from concurrent import futures
from contextlib import ExitStack
from dataclasses import replace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from batch.build_index import build_image_index
from batch.images import ImageRecord
from batch.publish import new_staging, publish
from batch.reindex import link_or_copy_tree
from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import artifact
from services.encoder import server as encoder_server
from services.gateway import server as gateway_server
from services.gateway.client import Client
from services.gateway.downstream import grpc_target
from services.index import server as index_server
from services.common.items import read_items
from services.common.shards import shard_of
from tests.conftest import wait_serving

SHARDS = 3
DUPLICATES_THRESHOLD = 0.8  # low enough that CIFAR-10's photos have some near-duplicate groups
QUERIES = ["ship", "dog", "cat sofa", "airplane+sky", "truck:2 road", "frog-bird", "ocean"]


@pytest.fixture(scope="module")
def sharded_artifact(artifact_root, tmp_path_factory):
    """The session artifact with its image index written again as 3 shards, by the function that batch-train
    and make index use, beside the same model files (no training: same vectors by construction)."""
    whole = artifact.resolve(artifact_root)
    manifest = artifact.read_manifest(whole)
    root = tmp_path_factory.mktemp("sharded")
    staging = new_staging(root)
    link_or_copy_tree(whole, staging, leave_out=whole / artifact.INDEXES / "images")
    items = read_items(whole / artifact.INDEXES / "images" / "items.jsonl")
    vectors = np.load(whole / artifact.INDEXES / "images" / "vectors.npy")
    features = np.load(whole / artifact.INDEXES / "images" / "features.npy")
    images = build_image_index(staging, vectors, [ImageRecord(i.id, i.path, i.label) for i in items], SHARDS,
                               features)
    publish(staging, root, replace(manifest, indexes={**manifest.indexes, "images": images}))
    return root


def test_shards_partition_the_same_images(artifact_root, sharded_artifact):
    whole, sharded = artifact.resolve(artifact_root), artifact.resolve(sharded_artifact)
    assert artifact.read_manifest(sharded).indexes["images"].shards == SHARDS
    parts = [sharded / "indexes" / "images" / f"shard-{i}" for i in range(SHARDS)]
    items = [item for part in parts for item in read_items(part / "items.jsonl")]
    vectors = np.concatenate([np.load(part / "vectors.npy") for part in parts])
    reference = {item.id: row for row, item in enumerate(read_items(whole / "indexes/images/items.jsonl"))}
    assert sorted(i.id for i in items) == sorted(reference) and all(len(read_items(p / "items.jsonl")) for p in parts)
    expected = np.load(whole / "indexes/images/vectors.npy")[[reference[i.id] for i in items]]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    features = np.concatenate([np.load(part / artifact.FEATURES) for part in parts])  # each shard its images' own
    assert features.dtype == np.float16 and features.shape == (1000, 1280)
    assert np.array_equal(features, np.load(whole / "indexes/images" / artifact.FEATURES)[[reference[i.id] for i in items]])


@pytest.fixture(scope="module")
def sharded_gateway(sharded_artifact):
    """Three shard processes' worth of index servers, a words index server, an encoder and a gateway."""
    with ExitStack() as stack:
        shard_ports = [stack.enter_context(index_server.run_server(0, str(sharded_artifact), names=["images"], shard=i))[1]
                       for i in range(SHARDS)]
        words_port = stack.enter_context(index_server.run_server(0, str(sharded_artifact), names=["words"]))[1]
        encoder_port = stack.enter_context(encoder_server.run_server(0, str(sharded_artifact)))[1]
        shard_addresses = [f"127.0.0.1:{port}" for port in shard_ports]
        gateway_port = stack.enter_context(gateway_server.run_server(
            0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{words_port}", timeout=2.0, image_shards=shard_addresses))[1]
        address = f"127.0.0.1:{gateway_port}"
        wait_serving(address)
        yield address, shard_addresses, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{words_port}"


def test_each_shard_server_holds_one_shard(artifact_root, sharded_gateway):
    shard_addresses = sharded_gateway[1]
    total = artifact.read_manifest(artifact.resolve(artifact_root)).indexes["images"].size
    sizes = []
    for number, address in enumerate(shard_addresses):
        with grpc.insecure_channel(address) as channel:
            (info,) = index_pb2_grpc.IndexStub(channel).Info(index_pb2.IndexInfoRequest()).indexes
        assert (info.name, info.shard, info.shards) == ("images", number, SHARDS)
        sizes.append(info.size)
    assert sum(sizes) == total and min(sizes) > total / SHARDS * 0.75


def test_three_shards_answer_exactly_as_one(services, sharded_gateway):
    with Client(services.gateway) as whole, Client(sharded_gateway[0]) as sharded:
        for query in QUERIES:
            one, three = whole.search(query, k=25), sharded.search(query, k=25)
            assert [h.id for h in one] == [h.id for h in three], query
            np.testing.assert_allclose([h.score for h in one], [h.score for h in three], atol=1e-5)
        for image_id in ("ship/0003.jpg", "cat/0010.jpg"):
            assert [h.id for h in whole.similar(id=image_id, k=10)] == [h.id for h in sharded.similar(id=image_id, k=10)]
        assert [w.word for w in whole.words("said", k=5)] == [w.word for w in sharded.words("said", k=5)]
        for image_id in ("ship/0003.jpg", "cat/0010.jpg", "truck/0042.jpg"):  # GetImage asks the owning shard
            assert whole.image(image_id) == sharded.image(image_id)


def test_concurrent_searches_over_three_shards_answer_as_one(services, sharded_gateway):
    """Searches at once, which the gateway may batch (one SearchMany per shard, merged per search)."""
    queries = QUERIES * 6
    with Client(services.gateway) as whole, Client(sharded_gateway[0]) as sharded, futures.ThreadPoolExecutor(12) as pool:
        expected = {query: [h.id for h in whole.search(query, k=10)] for query in set(queries)}
        answers = list(pool.map(lambda query: [h.id for h in sharded.search(query, k=10)], queries))
    assert answers == [expected[query] for query in queries]


def test_a_mixed_query_explained_over_three_shards_answers_as_one(services, sharded_gateway):
    """Image ids resolved on their shards, the results' vectors from each shard, the words from the word index."""
    query = "water + img:ship/0003.jpg - img:cat/0010.jpg + img:truck/0042.jpg"
    with Client(services.gateway) as whole, Client(sharded_gateway[0]) as sharded:
        one, three = whole.search(query, k=10, explain=True), sharded.search(query, k=10, explain=True)
        assert [h.id for h in one] == [h.id for h in three]
        for a, b in zip(one, three):
            assert [s.term for s in a.explanation.shares] == [s.term for s in b.explanation.shares]
            np.testing.assert_allclose([s.share for s in a.explanation.shares], [s.share for s in b.explanation.shares],
                                       atol=1e-5)
            assert [w.word for w in a.explanation.words] == [w.word for w in b.explanation.words]
        similar = sharded.similar(id="ship/0003.jpg", k=5, explain=True)
        assert [h.id for h in similar] == [h.id for h in whole.similar(id="ship/0003.jpg", k=5)]
        assert all(len(h.explanation.words) == 5 for h in similar)


def test_near_duplicates_over_three_shards_are_those_of_one_index(services, sharded_gateway):
    """The gateway gathers every shard's features, so pairs across shards (most of them) are found too."""
    with Client(services.gateway, timeout=120) as whole, Client(sharded_gateway[0], timeout=120) as sharded:
        one, three = whole.duplicates(threshold=DUPLICATES_THRESHOLD), sharded.duplicates(threshold=DUPLICATES_THRESHOLD)
    assert one.images == three.images == 1000 and one.total_groups >= 3
    assert any(len({shard_of(hit.id, SHARDS) for hit in group}) > 1 for group in one.groups)  # some span shards
    assert {frozenset(h.id for h in g) for g in one.groups} == {frozenset(h.id for h in g) for g in three.groups}


def test_filters_and_pages_over_three_shards_answer_as_one(services, sharded_gateway):
    with Client(services.gateway) as whole, Client(sharded_gateway[0]) as sharded:
        for labels, folder in (((), ""), (("cat", "dog"), ""), ((), "ship")):
            pages, token = [], ""
            for _ in range(3):
                page = sharded.search("animal", k=10, labels=list(labels), folder=folder, page_token=token)
                pages += [h.id for h in page]
                token = page.next_page_token
            assert pages == [h.id for h in whole.search("animal", k=30, labels=list(labels), folder=folder)]


def test_listing_three_shards_gives_the_one_index_by_id(services, sharded_gateway):
    with Client(services.gateway) as whole, Client(sharded_gateway[0]) as sharded:
        every = [h.id for h in whole.all_images()]
        assert every == sorted(every) and len(set(every)) == len(every) == 1000
        assert [h.id for h in sharded.all_images()] == every
        listed, after = [], ""
        while True:
            page, after = sharded.list_images("ship", after, limit=30)
            listed += [h.id for h in page]
            if not after:
                break
        assert listed == [i for i in every if i.startswith("ship/")] and len(listed) > 30


def test_a_shard_that_is_down_fails_the_query_by_name(sharded_gateway):
    _, shard_addresses, encoder_address, words_address = sharded_gateway
    down = [shard_addresses[0], "127.0.0.1:1", shard_addresses[2]]  # nothing listens on port 1
    with gateway_server.run_server(0, encoder_address, words_address, timeout=2.0, image_shards=down) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(text="ship", k=5), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"image shard 1 of {SHARDS} is unavailable" in error.value.details()
        assert "127.0.0.1" not in error.value.details()  # no internal address to outside callers
        assert time.monotonic() - started < 5


def _shard_sizes(shard_addresses: list[str]) -> list[int]:
    sizes = []
    for address in shard_addresses:
        with grpc.insecure_channel(address) as channel:
            sizes.append(index_pb2_grpc.IndexStub(channel).Info(index_pb2.IndexInfoRequest()).indexes[0].size)
    return sizes


def test_live_updates_land_on_the_owning_shard(sharded_gateway, cifar):
    address, shard_addresses, _, _ = sharded_gateway
    photos = [(cifar / "test" / "cat" / f"{n:04d}.jpg").read_bytes() for n in range(4)]
    before = _shard_sizes(shard_addresses)
    with Client(address) as client:
        ids = client.add_images(photos, ["cat"] * 4)
        owners = [shard_of(i, SHARDS) for i in ids]
        assert _shard_sizes(shard_addresses) == [size + owners.count(n) for n, size in enumerate(before)]
        for photo, image_id in zip(photos, ids):
            assert client.similar(photo, k=1)[0].id == image_id
            assert image_id not in [h.id for h in client.similar(id=image_id, k=5)]
        with pytest.raises(grpc.RpcError) as error:  # one id unknown: nothing deleted on any shard
            client.delete_images([*ids, "no/such.jpg"])
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.delete_images(ids) == 4
    assert _shard_sizes(shard_addresses) == before


def test_replica_lists_become_round_robin_targets():
    assert grpc_target("127.0.0.1:1") == "127.0.0.1:1"
    assert grpc_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="IP addresses"):
        grpc_target("encoder-a:1,encoder-b:1")


def test_no_query_fails_while_an_encoder_replica_stops(artifact_root, services):
    """Two encoder replicas behind the gateway; one is stopped in the middle of a load run."""
    with ExitStack() as stack:
        doomed = ExitStack()
        ports = [doomed.enter_context(encoder_server.run_server(0, str(artifact_root)))[1],
                 stack.enter_context(encoder_server.run_server(0, str(artifact_root)))[1]]
        for port in ports:
            wait_serving(f"127.0.0.1:{port}")
        replicas = ",".join(f"127.0.0.1:{port}" for port in ports)
        gateway_port = stack.enter_context(gateway_server.run_server(0, replicas, services.index, timeout=5.0))[1]
        wait_serving(f"127.0.0.1:{gateway_port}")
        errors, answered, stop = [], [], threading.Event()

        def load(worker: int) -> None:
            with Client(f"127.0.0.1:{gateway_port}", timeout=10) as client:
                while not stop.is_set():
                    try:
                        answered.append(len(client.search(QUERIES[worker % len(QUERIES)], k=5)))
                    except grpc.RpcError as error:
                        errors.append(f"{error.code().name}: {error.details()}")

        def wait_for_answers(count: int) -> None:
            deadline = time.monotonic() + 120  # a generous bound for slow machines, never reached when healthy
            while len(answered) < count and not errors and time.monotonic() < deadline:
                time.sleep(0.05)

        workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        wait_for_answers(40)
        before_stop = len(answered)
        doomed.close()  # replica 0 drains and stops while the load goes on
        stopped_at = len(answered)
        wait_for_answers(stopped_at + 40)
        stop.set()
        for worker in workers:
            worker.join()
    assert errors == [], errors[:5]
    assert before_stop >= 40 and len(answered) >= stopped_at + 40 and set(answered) == {5}, \
        (before_stop, stopped_at, len(answered))


class CountingEncoder(encoder_pb2_grpc.EncoderServicer):
    """A fake encoder replica that counts its calls (plumbing: how the gateway spreads load)."""

    def __init__(self, vector):
        self.calls = 0
        self.vector = vector

    def EncodeText(self, request, context):
        self.calls += 1
        return encoder_pb2.EncodeTextResponse(vector=encoder_pb2.Vector(values=self.vector))


def test_calls_are_spread_over_every_replica(services):
    with grpc.insecure_channel(services.encoder) as channel:
        vector = encoder_pb2_grpc.EncoderStub(channel).EncodeText(encoder_pb2.EncodeTextRequest(text="dog")).vector.values
    replicas, servers = [CountingEncoder(vector) for _ in range(3)], []
    try:
        for replica in replicas:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            encoder_pb2_grpc.add_EncoderServicer_to_server(replica, server)
            health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "" is SERVING
            servers.append((server, server.add_insecure_port("127.0.0.1:0")))
            server.start()
        addresses = ",".join(f"127.0.0.1:{port}" for _, port in servers)
        with gateway_server.run_server(0, addresses, services.index) as (_, port), Client(f"127.0.0.1:{port}") as client:
            wait_serving(f"127.0.0.1:{port}")
            for _ in range(30):
                assert len(client.search("dog", k=3)) == 3
    finally:
        for server, _ in servers:
            server.stop(0)
    assert sum(r.calls for r in replicas) == 30 and all(r.calls >= 5 for r in replicas), [r.calls for r in replicas]
