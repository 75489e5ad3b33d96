"""The exported ONNX backbone against the torch model it came from, on real photos."""

import numpy as np
import torch

from batch import backbones
from batch.extract import FeatureExtractor
from services.common import artifact
from services.encoder.image_encoder import ImageEncoder


def test_onnx_matches_torch_on_real_photos(artifact_root, cifar):
    spec = backbones.spec("efficientnet-lite0")
    encoder = ImageEncoder(artifact.resolve(artifact_root) / artifact.BACKBONE, spec.preprocessing)
    photos = [p.read_bytes() for p in sorted((cifar / "test" / "ship").iterdir())[:4]] + \
             [p.read_bytes() for p in sorted((cifar / "test" / "cat").iterdir())[:4]]
    onnx_features = encoder.features(photos)
    with torch.no_grad():
        torch_features, logits = spec.build(None)(torch.from_numpy(np.stack([encoder.pixels(p) for p in photos])))
    assert onnx_features.shape == (8, 1280)
    np.testing.assert_allclose(onnx_features, torch_features.numpy(), atol=1e-4)
    assert logits.shape == (8, 1000)


def test_ray_callable_reports_unreadable_files_without_failing(artifact_root, cifar, tmp_path):
    spec = backbones.spec("efficientnet-lite0")
    encoder = FeatureExtractor(artifact.resolve(artifact_root) / artifact.BACKBONE, spec.preprocessing)
    good = sorted((cifar / "test" / "dog").iterdir())[0]
    (tmp_path / "empty.jpg").write_bytes(b"")
    batch = {"path": np.asarray([str(good), str(tmp_path / "empty.jpg"), str(tmp_path / "gone.jpg")], dtype=object),
             "key": np.asarray(["a", "b", "c"], dtype=object)}
    out = encoder(batch)
    assert list(out["error"][:1]) == [""] and "empty" in out["error"][1] and out["error"][2]
    np.testing.assert_allclose(out["features"][0], encoder.features([good.read_bytes()])[0], atol=1e-5)
    assert not out["features"][1:].any()
