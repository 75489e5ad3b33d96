"""Image decoding limits and preprocessing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from services.encoder.images import ImageError, Preprocessing, decode


def jpeg(width=40, height=20, color=(127, 127, 127)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_preprocessing_crops_the_centre_square_and_scales():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # the white centre third survives the crop
    pixels = Preprocessing(32, (127, 127, 127), (128, 128, 128))(image)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[:, 8:24, 8:24], 1.0, atol=0.01)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, I am text", "not an image"),
    (jpeg()[:100], "cannot be decoded"),
    (png_claiming(100_000, 100_000), "pixels"),
])
def test_bad_images_say_why(data, message):
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_a_real_jpeg_decodes():
    assert decode(jpeg(40, 20)).size == (40, 20)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr"])
@pytest.mark.parametrize("size", [(20, 7), (300, 90), (90, 3000)])
def test_every_mode_and_shape_preprocesses_to_the_model_size(mode, size):
    """Crop first, shrink, then convert: the same result shape for every mode, without large copies."""
    pixels = Preprocessing(32, (127, 127, 127), (128, 128, 128))(Image.new(mode, size))
    assert pixels.shape == (3, 32, 32) and np.all(np.isfinite(pixels))


def test_shrinking_before_converting_keeps_the_colours():
    image = Image.new("RGBA", (640, 320), (200, 100, 50, 0))
    image.paste((10, 20, 30, 255), (160, 0, 480, 320))  # the centre square
    pixels = Preprocessing(32, (0, 0, 0), (1, 1, 1))(image)
    np.testing.assert_allclose(pixels[:, 4:28, 4:28].mean(axis=(1, 2)), [10, 20, 30], atol=1)


def test_the_pixel_limit_holds_before_decoding_and_jpeg_is_judged_after_draft():
    with pytest.raises(ImageError, match="the limit is"):
        decode(png_claiming(4001, 4000))
    assert decode(jpeg(8000, 6000), size_hint=224).size == (1000, 750)
