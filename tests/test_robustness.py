"""Bad input from every side, random requests, a downstream that goes away and comes back, and a
batch job killed halfway: the system answers with documented errors and loses nothing."""

import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from contextlib import ExitStack

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, index_pb2, index_pb2_grpc
from services.common import artifact
from services.encoder import server as encoder_server
from services.gateway import server as gateway_server
from tests.conftest import REPO, TEST_BACKBONE, TRAIN_PER_LABEL, wait_serving
from tests.helpers import status_of

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def gateway(services):
    with grpc.insecure_channel(services.gateway, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def bomb_png(width=100_000, height=100_000) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + \
        b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_mixed_scripts_emoji_and_punctuation(gateway):
    assert status_of(gateway.Search, gateway_pb2.SearchRequest(text="🐱 кошка 猫", k=5)) == \
        (grpc.StatusCode.NOT_FOUND, "unknown words: 🐱, кошка, 猫")
    ok = gateway.Search(gateway_pb2.SearchRequest(text="cat, sofa!", k=5)).results
    same = gateway.Search(gateway_pb2.SearchRequest(text="cat sofa", k=5)).results
    assert [r.id for r in ok] == [r.id for r in same]
    assert len(gateway.Search(gateway_pb2.SearchRequest(text="naïve café", k=3)).results) == 3


def test_huge_inputs(gateway):
    code, details = status_of(gateway.Search, gateway_pb2.SearchRequest(text="dog " * 25_000, k=5))  # 100 kB
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit is 1000" in details
    code, details = status_of(gateway.Tag, gateway_pb2.TagRequest(image=bomb_png(), k=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in details
    code, _ = status_of(gateway.Tag, gateway_pb2.TagRequest(image=b"\xff" * (17 << 20), k=5))  # over 16 MiB
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_direct_calls_on_each_service(services):
    with grpc.insecure_channel(services.encoder) as e, grpc.insecure_channel(services.index) as i:
        encoder, index = encoder_pb2_grpc.EncoderStub(e), index_pb2_grpc.IndexStub(i)
        vector = lambda values: index_pb2.FloatVector(values=values)  # noqa: E731
        cases = [
            (encoder.EncodeText, encoder_pb2.EncodeTextRequest(text=" "), grpc.StatusCode.INVALID_ARGUMENT),
            (encoder.EncodeText, encoder_pb2.EncodeTextRequest(text="qqzzyx"), grpc.StatusCode.NOT_FOUND),
            (encoder.EncodeImage, encoder_pb2.EncodeImageRequest(image=b""), grpc.StatusCode.INVALID_ARGUMENT),
            (encoder.EncodeImage, encoder_pb2.EncodeImageRequest(image=bomb_png()), grpc.StatusCode.INVALID_ARGUMENT),
            (index.Search, index_pb2.IndexSearchRequest(index="images", vector=vector([math.inf] * 50), k=5),
             grpc.StatusCode.INVALID_ARGUMENT),
            (index.Search, index_pb2.IndexSearchRequest(index="images", vector=vector([1.0] * 50), k=1001),
             grpc.StatusCode.INVALID_ARGUMENT),
            (index.Search, index_pb2.IndexSearchRequest(index="images", vector=vector([1.0] * 50), k=5,
                                                        min_score=math.nan), grpc.StatusCode.INVALID_ARGUMENT),
            (index.Search, index_pb2.IndexSearchRequest(index="images", id="no/such.jpg", k=5), grpc.StatusCode.NOT_FOUND),
            (index.Search, index_pb2.IndexSearchRequest(index="images", k=5), grpc.StatusCode.INVALID_ARGUMENT),
            (index.GetVectors, index_pb2.GetVectorsRequest(index="images", ids=["x"] * 1001),
             grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
        for call, request, expected in cases:
            assert status_of(call, request)[0] == expected, request
    for address in (services.encoder, services.index, services.gateway):
        wait_serving(address, timeout=5)


def _photo_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


requests = st.one_of(
    st.builds(lambda text, k, score: ("Search", gateway_pb2.SearchRequest(text=text, k=k, min_score=score)),
              st.text(max_size=60), st.integers(-5, 1100), st.none() | st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda data, k: ("Tag", gateway_pb2.TagRequest(image=data, k=k)),
              st.binary(max_size=300) | st.integers(0, 50).map(_photo_bytes), st.integers(-2, 1100)),
    st.builds(lambda word, k: ("SimilarWords", gateway_pb2.SimilarWordsRequest(word=word, k=k)),
              st.text(max_size=20), st.integers(-2, 1100)),
    st.builds(lambda image_id, k: ("SimilarImages", gateway_pb2.SimilarImagesRequest(id=image_id, k=k)),
              st.sampled_from(["ship/0001.jpg", "cat/0002.jpg", "", "../../etc/passwd", "x" * 300]), st.integers(-2, 1100)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests)
def test_random_requests_get_a_result_or_a_documented_error(gateway, services, named_request):
    method, request = named_request
    try:
        response = getattr(gateway, method)(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in DOCUMENTED, (error.code(), error.details())
        assert error.details()
        return
    items = list(getattr(response, "results", None) or getattr(response, "words", None) or [])
    assert len(items) <= max(request.k, 0)
    assert all(-1.0001 <= item.score <= 1.0001 for item in items)
    if "min_score" in request.DESCRIPTOR.fields_by_name and request.HasField("min_score"):
        assert all(item.score >= request.min_score for item in items)


def test_health_stays_serving_after_the_random_requests(services):
    for address in (services.gateway, services.encoder, services.index):
        wait_serving(address, timeout=5)


def test_gateway_recovers_by_itself_when_the_encoder_comes_back(artifact_root, services):
    request = gateway_pb2.SearchRequest(text="dog", k=3)
    with ExitStack() as first_encoder:
        port = first_encoder.enter_context(encoder_server.run_server(0, str(artifact_root)))[1]
        address = f"127.0.0.1:{port}"  # the second encoder comes back on the same port
        with gateway_server.run_server(0, address, services.index, timeout=1.0) as (_, gateway_port), \
                grpc.insecure_channel(f"127.0.0.1:{gateway_port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            wait_serving(address)
            wait_serving(f"127.0.0.1:{gateway_port}")
            assert len(stub.Search(request, timeout=10).results) == 3
            first_encoder.close()
            # a text asked before is answered from the gateway's text-vector cache; a new one needs the encoder
            assert len(stub.Search(request, timeout=10).results) == 3
            new_text = gateway_pb2.SearchRequest(text="cat", k=3)
            started = time.monotonic()
            code, details = status_of(stub.Search, new_text)
            assert code == grpc.StatusCode.UNAVAILABLE and "encoder" in details and time.monotonic() - started < 5
            with encoder_server.run_server(port, str(artifact_root)):
                wait_serving(address)
                deadline = time.monotonic() + 15
                while status_of(stub.Search, new_text)[0] != grpc.StatusCode.OK:
                    assert time.monotonic() < deadline, "gateway did not recover"
                    time.sleep(0.2)
                health = health_pb2_grpc.HealthStub(channel)
                while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline, "gateway health did not recover"
                    time.sleep(0.2)


def test_a_killed_batch_job_resumes_from_its_cache(artifact_root, cifar, tmp_path):
    """SIGKILL during extraction; the rerun extracts only the rest and publishes the same artifact."""
    cache, out = tmp_path / "cache", tmp_path / "artifacts"
    command = [sys.executable, "-m", "batch.train", "--data", str(cifar / "train"), "--artifacts", str(out),
               "--cache", str(cache), "--limit-per-label", str(TRAIN_PER_LABEL), "--epochs", "15", "--no-quality",
               "--backbone", TEST_BACKBONE]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    parts = cache / "features" / TEST_BACKBONE
    deadline = time.monotonic() + 300
    while len(list(parts.glob("part-*.npz"))) < 3:
        assert job.poll() is None and time.monotonic() < deadline, "extraction did not start"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not out.exists() or not (out / artifact.CURRENT).exists()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    resumed = artifact.resolve(out)
    report = json.loads((resumed / artifact.REPORT).read_text())["images"]
    assert report["from_cache"] >= 3 * 64 and report["extracted_now"] + report["from_cache"] == 10 * TRAIN_PER_LABEL
    reference = artifact.resolve(artifact_root)  # the same job, never interrupted
    images = f"{artifact.INDEXES}/images/"
    assert (resumed / images / "items.jsonl").read_text() == (reference / images / "items.jsonl").read_text()
    # The same head (the reference also chose its modes on real photos, so its index may use another mode).
    with np.load(resumed / artifact.HEAD) as ours, np.load(reference / artifact.HEAD) as theirs:
        for name in ("w1", "b1", "w2", "b2"):
            np.testing.assert_allclose(ours[name], theirs[name], atol=1e-3)
