"""Near-duplicates through the real services: copies of real photos found by FindDuplicates (the real
feature extractor, the artifact written by `make index`'s publishing step, the index's features streamed
to the gateway); the CLI; bad requests; an image added live; an artifact from before features were kept.

The collection is the issue's test set: resized, recompressed and 90%-cropped copies of 200 real photos
of the test half of imagenet200's categories (batch/duplicate_copies.py; the default threshold was chosen
on copies of the other half's photos, bench/duplicates.py), made here with other crop offsets, mixed
into imagenet200's 1,000 photos and 1,000 CIFAR-10 photos (the session artifact's training photos, whose
features the session's feature cache already holds).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from PIL import Image

from batch import duplicate_copies, reindex
from batch.extract import extract
from batch.images import labelled, list_images
from batch.train import limit
from semsearch.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import artifact
from services.common.wait_ready import wait_serving
from services.encoder import server as encoder_server
from services.encoder.images import Preprocessing
from services.gateway import cli
from services.gateway import duplicates
from services.gateway import server as gateway_server
from services.gateway.client import Client
from services.index import server as index_server
from tests.conftest import TEST_BACKBONE, TRAIN_PER_LABEL
from tests.helpers import status_of

TEST_SEED = 1  # crop offsets; bench/duplicates.py's validation copies use 0


def linked_copy(version_dir: Path, root: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """An artifact root holding `version_dir` (hard links where possible) as its current version."""
    def link(source, target):
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(version_dir, root / version_dir.name, copy_function=link, ignore=shutil.ignore_patterns(*leave_out))
    (root / artifact.CURRENT).symlink_to(version_dir.name)
    return root


@dataclass(frozen=True)
class Served:
    gateway: str
    encoder: str
    artifacts: Path
    copies: list[duplicate_copies.Copy]
    images: int


@pytest.fixture(scope="module")
def served(artifact_root, ray_runtime, cache_dir, cifar, real_photos, tmp_path_factory) -> Served:
    """The collection indexed with the session artifact's model (features from the session's cache where it
    has them), published as `make index` publishes, and served by index, encoder and gateway."""
    work = tmp_path_factory.mktemp("duplicates")
    artifacts = linked_copy(artifact.resolve(artifact_root), work / "artifacts")
    sources = [replace(r, id=f"imagenet200/{r.id}") for r in duplicate_copies.sources(real_photos, "test")]
    copies = duplicate_copies.make_copies(sources, work / "copies", TEST_SEED)
    records = ([replace(r, id=f"imagenet200/{r.id}") for r in list_images(real_photos)]
               + [replace(r, id=f"cifar10/{r.id}") for r in limit(labelled(list_images(cifar / "train")), TRAIN_PER_LABEL)]
               + [c.record for c in copies])
    manifest = artifact.read_manifest(artifact.resolve(artifacts))
    extraction = extract(records, manifest.backbone.name, artifact.resolve(artifacts) / artifact.BACKBONE,
                         Preprocessing.from_dict(manifest.backbone.preprocessing), cache_dir / "features", actors=2)
    reindex.publish_images(artifacts, records, extraction, "imagenet200, cifar10/train (100 a label), copies")
    with ExitStack() as stack:
        index_port = stack.enter_context(index_server.run_server(0, str(artifacts), names=["images"]))[1]
        encoder_port = stack.enter_context(encoder_server.run_server(0, str(artifacts)))[1]
        port = stack.enter_context(gateway_server.run_server(0, f"127.0.0.1:{encoder_port}", f"127.0.0.1:{index_port}"))[1]
        wait_serving(f"127.0.0.1:{port}")
        yield Served(f"127.0.0.1:{port}", f"127.0.0.1:{encoder_port}", artifacts, copies, len(records))


def test_copies_of_real_photos_are_found_at_the_default_threshold(served):
    with Client(served.gateway, timeout=120) as client:
        found = client.duplicates()
    default = duplicates.default_threshold(TEST_BACKBONE)
    assert (found.threshold, found.images, found.without_features) == (default, 2600, 0)
    truth = duplicate_copies.true_pairs(served.copies)
    scores = duplicate_copies.pair_scores([[hit.id for hit in group] for group in found.groups], truth)
    print(f"\ntest copies at the default threshold {found.threshold}: {scores}")
    assert scores["true_pairs"] == 1200 and scores["precision"] >= 0.95 and scores["recall"] >= 0.90
    sizes = [len(group) for group in found.groups]
    assert sizes == sorted(sizes, reverse=True) and found.total_groups == len(found.groups) >= 180
    for group in found.groups:  # the most central image first; each result says where its file is
        assert group[0].score == 1.0 and all(default - 0.2 < hit.score <= 1.0 for hit in group)
        assert all(Path(hit.path).is_file() and hit.label for hit in group)
    whole = next(group for group in found.groups if len(group) == 4)
    assert len({hit.label for hit in whole}) == 1 and len({Path(hit.id).stem.split("-")[0] for hit in whole}) == 1


def test_a_folder_keeps_only_its_images(served):
    with Client(served.gateway, timeout=120) as client:
        found = client.duplicates(folder="copies", max_groups=3)
    assert found.images == 600 and len(found.groups) == 3 < found.total_groups
    assert all(hit.id.startswith("copies/") for group in found.groups for hit in group)


def test_cli_prints_groups_as_a_table_and_as_json(served, capsys):
    assert cli.main(["--gateway", served.gateway, "duplicates", "--json", "--max-groups", "2", "--threshold", "0.9"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["threshold"] == 0.9 and document["images"] == served.images and document["total_groups"] > 2
    assert [group["size"] for group in document["groups"]] == [len(group["images"]) for group in document["groups"]]
    assert len(document["groups"]) == 2 and document["groups"][0]["images"][0]["score"] == 1.0
    assert set(document["groups"][0]["images"][0]) == {"id", "path", "label", "score"}

    assert cli.main(["--gateway", served.gateway, "duplicates", "--folder", "copies/", "--max-groups", "1"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    default = re.escape(f"{duplicates.default_threshold(TEST_BACKBONE):g}")
    assert re.fullmatch(rf"\d+ group\(s\) of near-duplicates among 600 images \(threshold {default}\)", lines[0])
    assert lines[2].startswith("group 1: ") and lines[4].split()[3].startswith("copies/")
    assert "smaller group(s) not shown" in lines[-1]


@pytest.mark.parametrize("request_fields, named", [
    ({"threshold": 0.5}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"max_groups": -1}, "max_groups"), ({"folder": "x" * 2000}, "folder"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(served, request_fields, named):
    with grpc.insecure_channel(served.gateway) as channel:
        code, details = status_of(gateway_pb2_grpc.GatewayStub(channel).FindDuplicates,
                                  gateway_pb2.FindDuplicatesRequest(**request_fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details


def test_an_artifact_without_features_is_failed_precondition(served, tmp_path, capsys):
    """An artifact published before features were kept: the same version without its features.npy."""
    old = linked_copy(artifact.resolve(served.artifacts), tmp_path / "old", leave_out=(artifact.FEATURES,))
    with index_server.run_server(0, str(old), names=["images"]) as (_, index_port), \
            gateway_server.run_server(0, served.encoder, f"127.0.0.1:{index_port}") as (_, port):
        wait_serving(f"127.0.0.1:{port}")
        assert cli.main(["--gateway", f"127.0.0.1:{port}", "duplicates"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("semsearch: FAILED_PRECONDITION: ") and "make index" in message
    assert "keeps no backbone features" in message


def test_the_default_threshold_is_the_one_chosen_for_the_artifact_s_backbone(served, tmp_path):
    """The same features served as another backbone's (its name rewritten in a copy's manifest): the gateway
    takes that backbone's default, which the index names in its answer."""
    served_version = artifact.resolve(served.artifacts)
    other = linked_copy(served_version, tmp_path / "other", leave_out=(artifact.MANIFEST,))
    manifest = json.loads((served_version / artifact.MANIFEST).read_text())
    manifest["backbone"]["name"] = "efficientnet-lite2"
    (other / served_version.name / artifact.MANIFEST).write_text(json.dumps(manifest))
    with index_server.run_server(0, str(other), names=["images"]) as (_, index_port), \
            gateway_server.run_server(0, served.encoder, f"127.0.0.1:{index_port}") as (_, port):
        wait_serving(f"127.0.0.1:{port}")
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            found = client.duplicates(max_groups=1)
    assert found.threshold == duplicates.default_threshold("efficientnet-lite2") != duplicates.default_threshold(TEST_BACKBONE)


def test_an_image_added_live_is_grouped_with_its_original(served, real_photos):
    """A resized copy added through the gateway gets its features from the encoder, kept in the live log."""
    original = sorted((real_photos / "zebra").iterdir())[-1]  # not a source of the copies
    image = Image.open(original).convert("RGB")
    buffer = io.BytesIO()
    image.resize((image.width * 2 // 3, image.height * 2 // 3)).save(buffer, "JPEG", quality=85)
    with Client(served.gateway, timeout=120) as client:
        (added,) = client.add_images([buffer.getvalue()], ["zebra"])
        try:
            found = client.duplicates(max_groups=0)
        finally:
            client.delete_images([added])
        after = client.duplicates(folder="added")
    groups = [{hit.id for hit in group} for group in found.groups]
    assert {added, f"imagenet200/zebra/{original.name}"} in groups and found.images == served.images + 1
    assert after.images == 0 and after.groups == []
