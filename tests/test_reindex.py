"""make index: a folder made searchable with the current model, no training; only new or changed files
are extracted; removed files leave the index; the model files are the same ones."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np

from batch import reindex
from batch.publish import sha256
from services.common import artifact
from services.encoder.core import EncoderCore
from services.index.core import IndexSet

PHOTOS = [f"{label}/{n:04d}.jpg" for label in ("cat", "ship", "truck", "frog") for n in range(5)]


def test_a_folder_is_indexed_with_the_current_model_and_kept_in_step(artifact_root, ray_runtime, cifar, tmp_path,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="batch.extract")
    root = tmp_path / "artifacts"
    shutil.copytree(artifact_root, root, symlinks=True)
    model = artifact.resolve(root)
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    for name in PHOTOS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cifar / "test" / name, folder / name)

    first = reindex.run(root, folder, cache)
    report = json.loads((first / artifact.REPORT).read_text())["images"]
    assert (report["searchable"], report["extracted_now"], report["from_cache"]) == (20, 20, 0)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extracted 20/20 images")]
    assert progress and "images/s, about 0 s left" in progress[-1]  # no terminal here: log lines, not a bar
    assert artifact.resolve(root) == first != model
    for name in (artifact.HEAD, artifact.BACKBONE, "modes.npz", "indexes/words/vectors.npy"):  # the same model
        assert sha256(first / name) == sha256(model / name), name

    for n in range(3):  # three new photos, two removed
        shutil.copy(cifar / "test" / "dog" / f"{n:04d}.jpg", folder / "cat" / f"new{n}.jpg")
    (folder / "ship/0000.jpg").unlink()
    (folder / "frog/0004.jpg").unlink()
    second = reindex.run(root, folder, cache)
    report = json.loads((second / artifact.REPORT).read_text())["images"]
    assert (report["searchable"], report["extracted_now"], report["from_cache"]) == (21, 3, 18)
    manifest = artifact.read_manifest(second)
    assert manifest.indexes["images"].size == 21 and manifest.data.searchable == str(folder)

    images = IndexSet.load(second / artifact.INDEXES, manifest.version).get("images")
    ids = {item.id for item in images.items}
    assert "ship/0000.jpg" not in ids and "frog/0004.jpg" not in ids and "cat/new2.jpg" in ids
    # The photo as the encoder embeds it now (its default mode) finds itself: the index holds the same model's vector.
    (query,) = EncoderCore(second).encode_images([(folder / "cat/new2.jpg").read_bytes()])
    top = images.search(query, 1)[0]
    assert top.item.id == "cat/new2.jpg" and top.score > 0.999
    assert np.allclose(np.linalg.norm(images.vectors, axis=1), 1.0, atol=1e-4)
