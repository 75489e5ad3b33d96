"""Decode and preprocess images for the backbone, with limits on size and pixel count."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """The bytes are not an image this service can read (empty, truncated, unknown, too large)."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `size`, centre-crop a square, then (x - mean) / std per channel."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(int(data["size"]), tuple(data["mean"]), tuple(data["std"]))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> a float32 CHW array."""
        image = image.convert("RGB")
        width, height = image.size
        scale = self.size / min(width, height)
        resized = image.resize(
            (max(self.size, round(width * scale)), max(self.size, round(height * scale))),
            Image.BILINEAR,
        )
        left = (resized.width - self.size) // 2
        top = (resized.height - self.size) // 2
        square = resized.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(square, dtype=np.float32)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)


def decode(data: bytes, size_hint: int = 0) -> Image.Image:
    """Bytes -> a fully loaded PIL image, or ImageError saying why not."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(
                f"image is {image.width}x{image.height} pixels; the limit is {MAX_PIXELS:,} pixels"
            )
        if size_hint and image.format == "JPEG":
            image.draft("RGB", (size_hint, size_hint))
        image.load()
        return image
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"image has too many pixels: {error}") from None
    except UnidentifiedImageError:
        raise ImageError("bytes are not an image in a known format (JPEG, PNG, GIF, BMP, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"image cannot be decoded: {error}") from None
