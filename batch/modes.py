"""The encoder's modes built from a backbone: its ImageNet classifier, read out of the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from services.encoder.head import Head
from services.encoder.image_encoder import FEATURES_OUTPUT, LOGITS_OUTPUT
from services.encoder.modes import Familiarity, ModeParams, Modes, QueryExpansion, span_basis


def classifier_from_onnx(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(W (F, classes), b (classes,)) of the Gemm that turns the backbone's features into its logits."""
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gemm" and LOGITS_OUTPUT in node.output and node.input[0] == FEATURES_OUTPUT:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            if attributes.get("transB", 0):
                weight = weight.T
            return (weight * attributes.get("alpha", 1.0)).astype(np.float32), (bias * attributes.get("beta", 1.0))
    raise ValueError(f"{path}: no Gemm from 'features' to 'logits' (the ImageNet classifier) found")


def build_modes(backbone_path: str | Path, table: np.ndarray, head: Head | None, label_vectors: np.ndarray,
                familiarity: Familiarity | None = None, expansion: QueryExpansion | None = None,
                params: ModeParams = ModeParams(), class_names: list[str] | tuple[str, ...] = ()) -> Modes:
    """`table`: (classes, D) unit word vectors of the ImageNet classes (batch/class_table.py), named by
    `class_names` (shown in explanations)."""
    weight, bias = classifier_from_onnx(backbone_path)
    return Modes(head, weight, bias, table, span_basis(label_vectors), familiarity, expansion, params,
                 tuple(class_names))
