"""batch-train: image folder -> features (Ray Data) -> head (Ray Train) -> indexes -> published artifact.

`run` is its stages, each a function with a typed result: check_and_list (Inputs), load_space (Space),
extract_features (Extracted), fit_head (Training), choose_modes (Chosen), then write_files, write_report
and manifest_of into a staging folder that `publish` makes the current version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import ray

from batch import backbones, open_vocab, quality, word_vectors, wordnet
from batch.class_table import ClassParts, Enrichment, class_parts, expansions, imagenet_classes
from batch.build_index import build_indexes
from batch.extract import Extraction, extract
from batch.images import ImageRecord, labelled, list_images
from batch.modes import build_modes
from batch.publish import new_staging, publish
from batch.train_head import HeadConfig, HeadJob, TrainedHead, split, train_heads
from services.common import artifact
from services.encoder.modes import FILE as MODES_FILE, Familiarity, Modes, QueryExpansion
from services.index import live

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train"


@dataclass
class Options:
    data: Path
    index_data: Path | None
    artifacts: Path
    cache: Path
    word_vectors: str = word_vectors.PACKAGED
    backbone: str = backbones.DEFAULT
    backbone_weights: str | None = None
    head: HeadConfig = HeadConfig()
    val_fraction: float = 0.1
    limit_per_label: int = 0
    batch_size: int = 64
    actors: int = 0  # 0: one per CPU of the Ray cluster (divided by threads_per_actor)
    threads_per_actor: int = 1
    shards: int = 1
    quality: bool = True  # train the softmax baseline and zero-shot head; choose mode parameters on validation
    open_data: Path | None = None  # labelled real photos whose validation half validates open vocabulary
    wordnet_path: Path = wordnet.default_path()
    held_out: tuple[str, ...] | None = None  # labels left out of the zero-shot head (default: cat, truck)


def limit(records: list[ImageRecord], per_label: int) -> list[ImageRecord]:
    if not per_label:
        return records
    counts: dict[str | None, int] = {}
    kept = []
    for record in records:
        counts[record.label] = counts.get(record.label, 0) + 1
        if counts[record.label] <= per_label:
            kept.append(record)
    return kept


def with_live_updates(records: list[ImageRecord], artifacts: Path) -> tuple[list[ImageRecord], dict]:
    """The searchable images with the live log folded in: images added since are in, deleted ones out."""
    added, deleted = live.membership(artifacts)
    kept = [r for r in records if r.id not in deleted and r.id not in added]
    stored = live.live_dir(artifacts)
    folded = kept + [ImageRecord(e.id, str(stored / e.file), e.label) for e in added.values()]
    if added or deleted:
        log.info("live updates folded in: %d added images, %d deleted", len(added), len(records) - len(kept))
    return folded, {"added": len(added), "deleted": len(records) - len(kept)}


def backbone_onnx(options: Options) -> Path:
    """The exported backbone, cached by name and weights file."""
    tag = options.backbone
    if options.backbone_weights:
        tag += "-" + hashlib.sha1(Path(options.backbone_weights).read_bytes()).hexdigest()[:12]
    path = options.cache / "backbones" / f"{tag}.onnx"
    if not path.is_file():
        backbones.export_onnx(options.backbone, path, options.backbone_weights)
    return path


def _class_vectors(enrichment: Enrichment, parts: ClassParts, rows: dict[str, int],
                   names: wordnet.WordNet) -> tuple[np.ndarray, QueryExpansion]:
    """ConSE's class vectors and the text queries' expansion that goes with them."""
    table = parts.table(enrichment)
    found, expanded = expansions(names, rows, table)
    return table, QueryExpansion(tuple(found), expanded)


def _versions() -> dict[str, str]:
    names = ["torch", "onnxruntime", "scann", "ray", "numpy", "grpcio"]
    return {name: metadata.version(name) for name in names}


@dataclass
class Inputs:
    """Stage 1: the images to train on and to make searchable (the live log folded in), and the labels."""

    train: list[ImageRecord]
    index: list[ImageRecord]
    live_changes: dict[str, int]
    labels: list[str]


@dataclass
class Space:
    """Stage 2: the word vectors, the labels' target vectors and WordNet (ConSE's class vectors)."""

    words: word_vectors.WordVectors
    vocabulary: quality.Vocabulary
    targets: np.ndarray
    names: wordnet.WordNet


@dataclass
class Extracted:
    """Stage 3: backbone features of the readable images."""

    extraction: Extraction
    requested: int  # distinct images asked for (training, searchable and open-vocabulary photos)
    train: list[ImageRecord]  # the readable training images, in the rows of `features`
    index: list[ImageRecord]  # the readable searchable images
    features: np.ndarray
    label_ids: np.ndarray
    open_records: list[ImageRecord]


@dataclass
class Training:
    """Stage 4: the trained head, its split, and its tag hit@1 over the whole vocabulary on validation."""

    trained: TrainedHead
    train_rows: np.ndarray
    val_rows: np.ndarray
    tag_hit1: float
    extras: quality.Extras | None = None  # the softmax baseline and the zero-shot head (quality runs)


@dataclass
class Chosen:
    """Stage 5: the modes with parameters chosen on validation, the extra heads and the quality report."""

    modes: Modes
    params: dict
    extras: quality.Extras | None
    report: dict
    seconds: float


def run(options: Options) -> Path:
    """The whole job; returns the published artifact version directory."""
    started = time.perf_counter()
    inputs = check_and_list(options)
    space = load_space(options, inputs.labels)
    onnx_path = backbone_onnx(options)
    extracted = extract_features(options, inputs, onnx_path)
    training = fit_head(options, inputs.labels, extracted, space)
    chosen = choose_modes(options, onnx_path, inputs.labels, extracted, training, space)
    image_features = np.stack([extracted.extraction.features[r.path] for r in extracted.index])
    image_vectors = chosen.modes.embed(image_features)
    staging = new_staging(options.artifacts)
    try:
        indexes = write_files(staging, options, onnx_path, training, chosen, extracted, (image_vectors, image_features),
                              space.words)
        report = write_report(staging, inputs, extracted, training, chosen, started)
        version_dir = publish(staging, options.artifacts,
                              manifest_of(options, inputs.labels, extracted, space.words, training, chosen, indexes))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(summary(version_dir, report), flush=True)
    return version_dir


def check_and_list(options: Options) -> Inputs:
    """The options' checks and the image lists; ValueError for an unusable option or folder."""
    if options.shards < 1:
        raise ValueError(f"--shards must be at least 1; got {options.shards}")
    if options.head.patience < 0:
        raise ValueError(f"--patience must be 0 (off) or more; got {options.head.patience}")
    backbones.spec(options.backbone)
    train_records = limit(labelled(list_images(options.data)), options.limit_per_label)
    if not train_records:
        raise ValueError(f"{options.data}: no labelled images (expected one sub-folder per label)")
    index_records = (limit(list_images(options.index_data), options.limit_per_label)
                     if options.index_data else train_records)
    index_records, live_changes = with_live_updates(index_records, options.artifacts)
    log.info("data: %d labelled images in %s; %d searchable images", len(train_records), options.data, len(index_records))
    return Inputs(train_records, index_records, live_changes, sorted({r.label for r in train_records}))


def load_space(options: Options, labels: list[str]) -> Space:
    """WordNet, the word vectors and the labels' target vectors; ValueError naming the labels without one."""
    names = wordnet.load(options.wordnet_path)  # ImageNet class hypernyms, for ConSE's class vectors
    words = word_vectors.load(options.word_vectors)
    vocabulary = quality.Vocabulary.of(words)
    targets = quality.label_matrix(labels, vocabulary.rows, words.vectors, words.source)
    log.info("word vectors: %s, %d words x %d", words.source, len(words.words), words.dimension)
    return Space(words, vocabulary, targets, names)


def extract_features(options: Options, inputs: Inputs, onnx_path: Path) -> Extracted:
    """Features of the training, searchable and open-vocabulary images (Ray Data, cached); ValueError when
    too few are readable."""
    with_open = options.open_data is not None and options.quality
    open_records = open_vocab.records(options.open_data, "validation") if with_open else []
    all_records = list({r.path: r for r in inputs.train + inputs.index + open_records}.values())
    actors = options.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // options.threads_per_actor)
    extraction = extract(all_records, options.backbone, onnx_path, backbones.spec(options.backbone).preprocessing,
                         options.cache / "features", options.batch_size, actors, options.threads_per_actor)
    train_ok = [r for r in inputs.train if r.path in extraction.features]
    index_ok = [r for r in inputs.index if r.path in extraction.features]
    if len({r.label for r in train_ok}) < 2:
        raise ValueError("need readable images of at least two labels to train the head")
    if not index_ok:
        raise ValueError(f"{options.index_data}: no readable images to make searchable")
    features = np.stack([extraction.features[r.path] for r in train_ok])
    label_ids = np.asarray([inputs.labels.index(r.label) for r in train_ok])
    return Extracted(extraction, len(all_records), train_ok, index_ok, features, label_ids, open_records)


def head_jobs(options: Options, labels: list[str], extracted: Extracted, space: Space
              ) -> tuple[list[HeadJob], list[str] | None]:
    """The head's job on the training split; with the quality extras (three labels or more, a validation
    split), the softmax baseline's and the zero-shot head's too, and the labels that one leaves out."""
    train_rows, val_rows = split(extracted.label_ids, options.val_fraction, options.head.seed)
    jobs = [HeadJob(extracted.label_ids, space.targets, train_rows, val_rows, options.head)]
    if not (options.quality and len(labels) >= 3 and len(val_rows)):
        return jobs, None
    held = quality.held_out_labels(labels, list(options.held_out or []), options.head.seed)
    return jobs + quality.extra_jobs(extracted.label_ids, labels, space.targets, train_rows, val_rows, options.head,
                                     held), held


def fit_head(options: Options, labels: list[str], extracted: Extracted, space: Space) -> Training:
    """The head (Ray Train) on the training split, and its tag hit@1 on the validation split; with the
    quality extras (three labels or more, a validation split), the softmax baseline and the zero-shot
    head too, in the same Ray Train run."""
    jobs, held = head_jobs(options, labels, extracted, space)
    train_rows, val_rows = jobs[0].train_rows, jobs[0].val_rows
    trained, *extra_heads = train_heads(extracted.features, jobs, options.cache / "ray-train")
    extras = quality.Extras(extra_heads[0].head, extra_heads[1].head, held) if held is not None else None
    val_tag = quality.tag_hits(trained.head(extracted.features[val_rows]), [extracted.train[i].label for i in val_rows],
                               space.vocabulary.rows, space.vocabulary.vectors, (1,))["tag_hit1"] if len(val_rows) else 0.0
    return Training(trained, train_rows, val_rows, val_tag, extras)


def encoder_modes(onnx_path: Path, extracted: Extracted, training: Training, space: Space, parts: ClassParts
                  ) -> Modes:
    """The four encoder modes with their default parameters: the ImageNet classifier, ConSE's class vectors,
    the head and the familiarity of the training photos."""
    train_rows, val_rows = training.train_rows, training.val_rows
    familiarity = Familiarity.fit(extracted.features[train_rows], extracted.label_ids[train_rows],
                                  extracted.features[val_rows] if len(val_rows) else extracted.features[train_rows])
    table, expansion = _class_vectors(Enrichment(), parts, space.vocabulary.rows, space.names)
    return build_modes(onnx_path, table, training.trained.head, space.targets, familiarity, expansion,
                       class_names=imagenet_classes()[0])


def open_set_of(extracted: Extracted, space: Space) -> open_vocab.OpenSet | None:
    """The open-vocabulary validation photos, with the broad words of their categories."""
    open_set = open_vocab.open_set(extracted.open_records, extracted.extraction.features)
    if open_set is not None:
        open_set.broad = open_vocab.broad_words(open_set.synsets, sorted(set(open_set.truth.tolist())), space.names,
                                                space.vocabulary.rows)
    return open_set


def choose_modes(options: Options, onnx_path: Path, labels: list[str], extracted: Extracted, training: Training,
                 space: Space) -> Chosen:
    """The extra heads, the mode parameters chosen on validation, and the quality report on it."""
    started = time.perf_counter()
    parts = class_parts(space.vocabulary.rows, space.words.vectors, space.names)
    modes = encoder_modes(onnx_path, extracted, training, space, parts)
    open_set = open_set_of(extracted, space)
    extras, mode_params, quality_report = training.extras, modes.params.to_dict(), {}
    val_rows, x, y = training.val_rows, extracted.features, extracted.label_ids
    if len(val_rows):
        zs_rows = quality.zero_shot_rows(y, val_rows, labels, extras.held_out) if extras else val_rows
        modes, mode_params = quality.choose(
            modes, labels, space.vocabulary, quality.Photos(x[val_rows], y[val_rows]), extras,
            quality.Photos(x[zs_rows], y[zs_rows]), open_set,
            lambda enrichment: _class_vectors(enrichment, parts, space.vocabulary.rows, space.names))
        quality_report = quality.report(modes, x[val_rows], [extracted.train[i].label for i in val_rows], labels,
                                        space.vocabulary, extras, ids=[extracted.train[i].id for i in val_rows])
    seconds = time.perf_counter() - started
    log.info("modes: default %s (chosen on validation) in %.1f s", modes.params.default, seconds)
    return Chosen(modes, mode_params, extras, quality_report, seconds)


def write_files(staging: Path, options: Options, onnx_path: Path, training: Training, chosen: Chosen,
                extracted: Extracted, images: tuple[np.ndarray, np.ndarray], words: word_vectors.WordVectors
                ) -> dict[str, artifact.IndexInfo]:
    """The artifact's files but the report and the manifest; returns the indexes' descriptions.
    `images`: the searchable images' vectors and backbone features, in the rows of `extracted.index`."""
    shutil.copyfile(onnx_path, staging / artifact.BACKBONE)
    training.trained.head.save(staging / artifact.HEAD)
    chosen.modes.save(staging / MODES_FILE)
    if chosen.extras is not None:
        (staging / quality.BASELINES).mkdir()
        chosen.extras.softmax.save(staging / quality.BASELINES / quality.SOFTMAX_HEAD)
        chosen.extras.zero_shot.save(staging / quality.BASELINES / quality.ZERO_SHOT_HEAD)
    if chosen.report:
        (staging / quality.REPORT_MD).write_text(quality.markdown(chosen.report))
    indexes = build_indexes(staging, images[0], extracted.index, words, options.shards, options.cache,
                            features=images[1])
    unreadable = extracted.extraction.unreadable
    (staging / artifact.UNREADABLE).write_text("".join(f"{p}\t{e}\n" for p, e in sorted(unreadable.items())))
    return indexes


def write_report(staging: Path, inputs: Inputs, extracted: Extracted, training: Training, chosen: Chosen,
                 started: float) -> dict:
    """report.json: counts, the head's validation figures, the quality report and the stages' seconds."""
    extraction, trained = extracted.extraction, training.trained
    report = {
        "images": {"labelled": len(inputs.train), "searchable": len(inputs.index),
                   "trained_on": len(training.train_rows), "validation": len(training.val_rows),
                   "unreadable": len(extraction.unreadable), "extracted_now": extraction.extracted,
                   "from_cache": extracted.requested - extraction.extracted - len(extraction.unreadable),
                   "extracted_by_node": extraction.by_node, "live_updates": inputs.live_changes},
        "validation": {"label_hit1": trained.val_hit1, "tag_hit1_whole_vocabulary": training.tag_hit1,
                       "best_epoch": trained.best_epoch, "epochs_trained": len(trained.history),
                       "history": trained.history},
        "quality": chosen.report,
        "seconds": {"extract": round(extraction.seconds, 1), "train_head": round(trained.seconds, 1),
                    "quality": round(chosen.seconds, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    (staging / artifact.REPORT).write_text(json.dumps(report, indent=2))
    return report


def manifest_of(options: Options, labels: list[str], extracted: Extracted, words: word_vectors.WordVectors,
                training: Training, chosen: Chosen, indexes: dict[str, artifact.IndexInfo]) -> artifact.Manifest:
    """The manifest but its version and checksums (publish adds them)."""
    return artifact.Manifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions=_versions(),
        backbone=artifact.Backbone(options.backbone, options.backbone_weights or "packaged",
                                   int(extracted.features.shape[1]),
                                   backbones.spec(options.backbone).preprocessing.to_dict()),
        word_vectors=artifact.WordSpace(words.source, words.dimension, len(words.words)),
        dimension=words.dimension,
        labels=labels,
        head=artifact.HeadInfo(dict(options.head.__dict__), training.trained.val_hit1),
        modes=chosen.params,
        quality=artifact.QualityInfo(chosen.extras.held_out if chosen.extras else [], options.head.seed,
                                     options.val_fraction),
        data=artifact.DataInfo(str(options.data), str(options.index_data or options.data),
                               str(options.open_data) if options.open_data else None),
        indexes=indexes,
    )


def summary(version_dir: Path, report: dict) -> str:
    images, val, seconds = report["images"], report["validation"], report["seconds"]
    return (
        f"\nbatch-train done in {seconds['total']:.0f} s -> {version_dir}\n"
        f"  images: {images['labelled']} labelled, {images['searchable']} searchable, "
        f"{images['extracted_now']} extracted now, {images['from_cache']} from cache, {images['unreadable']} unreadable\n"
        f"  validation ({images['validation']} images): label hit@1 {val['label_hit1']:.3f}, "
        f"tag hit@1 over the whole vocabulary {val['tag_hit1_whole_vocabulary']:.3f}\n"
        f"  seconds: extract {seconds['extract']}, train head {seconds['train_head']}, "
        f"quality (baseline, zero-shot head, mode choice, report) {seconds.get('quality', 0)}"
        + (f"\n  default mode {report['quality']['default_mode']}; report.md in the artifact"
           if report.get("quality") else "")
    )


def default_data(cache: Path) -> Path:
    if SHARED_CIFAR.is_dir():
        return SHARED_CIFAR
    from batch.cifar import ensure_cifar10

    return ensure_cifar10(cache / "cifar10")


def add_head_arguments(parser: argparse.ArgumentParser) -> None:
    """--epochs, --patience, --loss (defaults: $EPOCHS, $LOSS, else HeadConfig's), --val-fraction, --seed."""
    env = os.environ.get
    parser.add_argument("--epochs", type=int, default=int(env("EPOCHS", HeadConfig.epochs)))
    parser.add_argument("--patience", type=int, default=HeadConfig.patience,
                        help="stop a head's training after this many epochs without a better validation hit@1 "
                             f"(0: train every epoch; default {HeadConfig.patience})")
    parser.add_argument("--loss", choices=["cosine-softmax", "cosine", "hinge"], default=env("LOSS", HeadConfig.loss))
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None = None) -> Options:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="batch-train", description=__doc__)
    parser.add_argument("--data", default=env("DATA") or None,
                        help="labelled images, one sub-folder per label (default: ../shared/data/cifar10/train, "
                             "else CIFAR-10 downloaded by torchvision)")
    parser.add_argument("--index-data", default=env("INDEX_DATA") or None,
                        help="images to make searchable, read recursively (default: --data)")
    parser.add_argument("--artifacts", default=env("ARTIFACTS", "artifacts"), help="artifact root (default: artifacts)")
    parser.add_argument("--cache", default=env("CACHE", ".cache"), help="feature and model cache (default: .cache)")
    parser.add_argument("--word-vectors", default=env("WORDS", word_vectors.PACKAGED),
                        help="glove-6b-50d (packaged), a GloVe .txt file, or a .npy with a .words.txt beside it")
    parser.add_argument("--backbone", default=env("BACKBONE", backbones.DEFAULT), choices=sorted(backbones.BACKBONES))
    parser.add_argument("--backbone-weights", default=env("BACKBONE_WEIGHTS") or None,
                        help="a torchvision state_dict file for vgg16/resnet50, or an EfficientNet-Lite .pth")
    add_head_arguments(parser)
    parser.add_argument("--limit-per-label", type=int, default=0, help="use at most N images per label (quick runs)")
    parser.add_argument("--actors", type=int, default=0,
                        help="Ray Data extraction actors (default: the cluster's CPUs / --threads-per-actor)")
    parser.add_argument("--threads-per-actor", type=int, default=1,
                        help="ONNX Runtime threads per actor (default 1: measured fastest, see BENCHMARKS.md)")
    parser.add_argument("--shards", type=int, default=int(env("SHARDS", 1)),
                        help="write the image index as N shards, one per index process (default 1)")
    parser.add_argument("--open-data", default=env("OPEN_DATA") or open_vocab.default_folder(),
                        help="labelled real photos; the validation half of their categories (batch/open_vocab.py) "
                             "chooses the modes for words never trained on (default: ../shared/data/imagenet200 "
                             "if present; 'none' to skip)")
    parser.add_argument("--wordnet", default=str(wordnet.default_path()),
                        help="WordNet 3.0 data.noun (default: $WORDNET, else .cache/wordnet/data.noun: make wordnet)")
    parser.add_argument("--held-out", default=env("HELD_OUT") or None,
                        help="comma-separated labels left out of the zero-shot head (default: cat,truck if present)")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the softmax baseline, the zero-shot head, the open-vocabulary validation "
                             "and the quality report")
    args = parser.parse_args(argv)
    return Options(
        data=Path(args.data) if args.data else default_data(Path(args.cache)),
        index_data=Path(args.index_data) if args.index_data else None,
        artifacts=Path(args.artifacts), cache=Path(args.cache),
        word_vectors=args.word_vectors, backbone=args.backbone, backbone_weights=args.backbone_weights,
        head=HeadConfig(epochs=args.epochs, patience=args.patience, loss=args.loss, seed=args.seed),
        val_fraction=args.val_fraction, limit_per_label=args.limit_per_label,
        actors=args.actors, threads_per_actor=args.threads_per_actor, shards=args.shards,
        quality=not args.no_quality,
        open_data=None if args.open_data in (None, "", "none") else Path(args.open_data),
        wordnet_path=Path(args.wordnet),
        held_out=tuple(x.strip() for x in args.held_out.split(",") if x.strip()) if args.held_out else None,
    )


def ray_options() -> dict:
    """Join the cluster named by RAY_ADDRESS; otherwise start a local Ray of this machine's CPUs, never
    attaching to some other job's Ray that happens to run here."""
    address = os.environ.get("RAY_ADDRESS")
    return {"address": address} if address else {"address": "local", "num_cpus": os.cpu_count()}


def run_job(job) -> int:
    """A batch job's command line: progress logged, Ray started for it (ray_options) and shut down after;
    exit status 2 with the reason for a bad option, folder or artifact."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ray.is_initialized():
        ray.init(**ray_options(), log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)  # the job logs its own progress
    try:
        job()
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    finally:
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_job(lambda: run(options))


if __name__ == "__main__":
    sys.exit(main())
