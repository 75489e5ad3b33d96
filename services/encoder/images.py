"""Decode and preprocess images for the backbone, with limits on size and pixel count.

Memory per image is bounded by design: the pixel count is checked from the header before any pixel
is decoded (after JPEG's draft mode has shrunk what will be decoded), and preprocessing crops the
centre square before it scales, so no image is ever enlarged beyond `size` x `size`.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# 16 M pixels (4096 x 4096, or a 24 MP camera JPEG, which draft mode decodes at a quarter) is at most
# 64 MB decoded in the widest mode; larger images are refused before they are decoded.
MAX_PIXELS = 16_000_000
# Pillow's own bomb check runs at open, before JPEG draft mode can shrink the image, so it is set
# loose enough for what draft mode (down to 1/8 a side) brings under MAX_PIXELS; `decode` checks the rest.
Image.MAX_IMAGE_PIXELS = 64 * MAX_PIXELS // 2


class ImageError(ValueError):
    """The bytes are not an image this service can read (empty, truncated, unknown, too large)."""


@dataclass(frozen=True)
class Preprocessing:
    """Centre-crop a square, resize it to `size`, then (x - mean) / std per channel."""

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
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        # Crop before scaling (a 20000 x 1 image becomes 1 x 1 -> size x size, never 4.5M x size), and
        # shrink before converting, so that no full-size copy is made beside the decoded image.
        box: tuple[int, int, int, int] | None = (left, top, left + side, top + side)
        factor = side // self.size
        if image.mode.startswith("I;16") or image.mode == "1":
            image = image.convert("L")  # what RGB would hold too (values clipped at 255), at a quarter the size
        if factor >= 2 and image.mode in ("RGBA", "LA"):
            # reduce() would premultiply alpha in a full-size copy; alpha is dropped anyway, so reduce per band
            image = Image.merge(image.mode[:-1], [image.getchannel(band).reduce(factor, box) for band in image.mode[:-1]])
            box = None
        elif factor >= 2 and image.mode != "P":
            try:
                image, box = image.reduce(factor, box), None
            except ValueError:  # a mode reduce cannot take: converted whole below
                pass
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        square = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if square.mode != "RGB":
            square = square.convert("RGB")
        pixels = np.asarray(square, dtype=np.float32)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)


def decode(data: bytes, size_hint: int = 0) -> Image.Image:
    """Bytes -> a fully loaded PIL image, or ImageError saying why not."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        if size_hint and image.format == "JPEG":
            image.draft("RGB", (size_hint, size_hint))  # decode at 1/2, 1/4 or 1/8 where that is enough
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(
                f"image is {image.width}x{image.height} pixels; the limit is {MAX_PIXELS:,} pixels"
            )
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
