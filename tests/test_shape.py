"""The code's shape: short functions in batch/, one typed manifest (fast; no trained artifact needed)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from services.common import artifact
from tests.helpers import example_manifest as manifest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 50


def body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement of the body after the docstring to the end of the last statement,
    blank and comment lines among them included; the signature, decorators and docstring not counted."""
    body = function.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_no_function_in_batch_is_over_50_lines():
    """Every function and method in batch/ (nested ones too) has at most MAX_LINES body lines (body_lines)."""
    long = []
    for path in sorted((REPO / "batch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > MAX_LINES:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({body_lines(node)} lines)")
    assert not long, "functions over 50 lines: " + "; ".join(long)


def test_manifest_round_trips_through_the_json_on_disk(tmp_path):
    written = manifest()
    artifact.write_manifest(tmp_path, written)
    on_disk = json.loads((tmp_path / artifact.MANIFEST).read_text())
    assert on_disk["format_version"] == artifact.FORMAT_VERSION
    # the flat layout older readers and existing artifacts use
    assert on_disk["head"] == {"epochs": 25, "seed": 3, "validation_label_hit1": 0.75}
    assert on_disk["indexes"]["images"] == {"size": 10, "dimension": 50, "shards": 1, "brute_force": True}
    assert on_disk["word_vectors"] == {"source": "glove-6b-50d", "dimension": 50, "vocabulary": 400_000}
    read = artifact.read_manifest(tmp_path)
    assert read == written and read.head.seed == 3 and read.space == "glove-6b-50d:50"


def test_manifest_tolerates_unknown_keys_and_refuses_other_formats(tmp_path):
    data = manifest().to_dict()
    (tmp_path / artifact.MANIFEST).write_text(json.dumps({**data, "added_later": 1,
                                                         "data": {**data["data"], "note": "x"}}))
    assert artifact.read_manifest(tmp_path) == manifest()
    (tmp_path / artifact.MANIFEST).write_text(json.dumps({**data, "format_version": 2}))
    with pytest.raises(artifact.ArtifactError, match="artifact format 2 is not .*; rerun batch-train"):
        artifact.read_manifest(tmp_path)
    del data["labels"]
    (tmp_path / artifact.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(artifact.ArtifactError, match="'labels'.*rerun batch-train"):
        artifact.read_manifest(tmp_path)
