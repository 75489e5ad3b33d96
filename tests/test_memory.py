"""Memory per image call is bounded by design: thin, huge and many images against a real encoder
process, whose peak resident memory (VmHWM) is read from /proc."""

from __future__ import annotations

import io
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image

from semsearch.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.helpers import service_process

BUDGET_MB = 300
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh (Linux: write 5 to clear_refs); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def encoder(artifact_root, tmp_path_factory):
    with service_process("services.encoder.server", "--artifacts", str(artifact_root), "--reload-seconds", "0",
                         log=tmp_path_factory.mktemp("encoder") / "encoder.log") as (process, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield process.pid, encoder_pb2_grpc.EncoderStub(channel)


# Each: (name, bytes, the status Tag/EncodeImage must give). The first two sent gigabytes before.
CASES = [
    ("20000x1 PNG", lambda: encoded(Image.new("RGB", (20_000, 1), (200, 10, 10))), OK),
    ("1x200000 PNG", lambda: encoded(Image.new("RGB", (1, 200_000), (10, 200, 10))), OK),
    ("65535x2 grey PNG", lambda: encoded(Image.new("L", (65_535, 2), 90)), OK),
    ("60000x1 GIF", lambda: encoded(Image.new("P", (60_000, 1), 3), "GIF"), OK),
    ("4000x4000 RGBA PNG, at the pixel limit", lambda: encoded(Image.new("RGBA", (4000, 4000), (1, 2, 3, 4))), OK),
    ("4000x4000 16-bit grey PNG", lambda: encoded(Image.new("I;16", (4000, 4000), 1000)), OK),
    ("8000x6000 JPEG (decoded at 1/8)", lambda: encoded(Image.new("RGB", (8000, 6000), (9, 9, 9)), "JPEG"), OK),
    ("5000x5000 PNG, over the limit", lambda: encoded(Image.new("L", (5000, 5000), 7)), INVALID),
    ("1x30000000 PNG, over the limit", lambda: encoded(Image.new("1", (1, 30_000_000), 1)), INVALID),
]


def status_of(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=120)
        return OK
    except grpc.RpcError as error:
        return error.code()


def test_extreme_images_keep_the_encoders_memory_bounded(encoder):
    pid, stub = encoder
    warm = encoded(Image.new("RGB", (640, 480), (120, 130, 140)), "JPEG")
    assert status_of(stub.EncodeImages, encoder_pb2.EncodeImagesRequest(images=[warm] * 16)) == OK
    resting = memory_mb(pid, "VmRSS")
    baseline = resting if reset_peak(pid) else memory_mb(pid, "VmHWM")
    answers = {name: status_of(stub.EncodeImage, encoder_pb2.EncodeImageRequest(image=make()))
               for name, make, _ in CASES}
    many = [make() for name, make, _ in CASES[:4]] * 16  # 64 thin images in one call
    answers["64 thin images in one call"] = status_of(stub.EncodeImages, encoder_pb2.EncodeImagesRequest(images=many))
    big = CASES[4][1]()
    with futures.ThreadPoolExecutor(8) as pool:  # 8 at once: decodes wait for one of the slots
        concurrent = list(pool.map(lambda _: status_of(stub.EncodeImage, encoder_pb2.EncodeImageRequest(image=big)),
                                   range(8)))
    peak = memory_mb(pid, "VmHWM")
    print(f"\nencoder resting {resting:.0f} MB, peak {peak:.0f} MB: {peak - baseline:.0f} MB above")
    assert answers == {**{name: want for name, _, want in CASES}, "64 thin images in one call": OK}
    assert concurrent == [OK] * 8
    assert peak - baseline < BUDGET_MB


@pytest.mark.parametrize("name, make, want", CASES[:2] + CASES[-1:], ids=lambda c: c if isinstance(c, str) else "")
def test_tag_through_the_gateway_answers_thin_and_huge_images(services, name, make, want):
    with grpc.insecure_channel(services.gateway) as channel:
        assert status_of(gateway_pb2_grpc.GatewayStub(channel).Tag, gateway_pb2.TagRequest(image=make(), k=5)) == want
