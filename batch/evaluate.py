"""make eval: the quality report (batch/quality.py) of an artifact on a labelled image folder.

Features come through the batch job's feature cache, so images are extracted once; the softmax
baseline and the zero-shot head come from the artifact (trained by batch-train), or are trained
here on the artifact's training folder when it has none or other labels are held out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from batch import evaluate_mixed, evaluate_open, open_vocab, quality, wordnet
from batch.extract import extract
from batch.images import labelled, list_images
from batch.train_head import HeadConfig, split
from services.common import artifact
from services.encoder.core import EncoderCore
from services.encoder.head import Head
from services.encoder.images import Preprocessing
from services.encoder.modes import MODES

log = logging.getLogger(__name__)


def _features(records, encoder: EncoderCore, cache: Path) -> tuple[list, np.ndarray, int]:
    """Backbone features of `records` through the batch job's feature cache (Ray Data for the missing ones)."""
    import ray

    backbone = encoder.manifest.backbone
    actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
    extraction = extract(records, backbone.name, encoder.directory / artifact.BACKBONE,
                         Preprocessing.from_dict(backbone.preprocessing), cache / "features", 64, actors, 1)
    ok = [r for r in records if r.path in extraction.features]
    features = np.stack([extraction.features[r.path] for r in ok]) if ok else np.zeros((0, 1), np.float32)
    return ok, features, len(extraction.unreadable)


def _vocabulary(encoder: EncoderCore) -> quality.Vocabulary:
    return quality.Vocabulary(encoder.words, encoder.rows, encoder.word_vectors)


def _head_config(encoder: EncoderCore) -> HeadConfig:
    """The recipe the artifact's head was trained with."""
    return HeadConfig(**{k: v for k, v in encoder.manifest.head.config.items() if k in HeadConfig.__dataclass_fields__})


def _extras(encoder: EncoderCore, cache: Path, held_out: list[str] | None) -> tuple[quality.Extras | None, object]:
    """The artifact's softmax baseline and zero-shot head; trained here (and mode parameters chosen again
    on the training folder's validation split) when the artifact lacks them or other labels are held out."""
    labels = encoder.manifest.labels
    stored = encoder.manifest.quality
    baselines = encoder.directory / quality.BASELINES
    wanted = quality.held_out_labels(labels, held_out or stored.held_out or None, encoder.manifest.head.seed)
    if (baselines / quality.ZERO_SHOT_HEAD).is_file() and wanted == stored.held_out:
        return quality.Extras(Head.load(baselines / quality.SOFTMAX_HEAD), Head.load(baselines / quality.ZERO_SHOT_HEAD),
                              wanted), encoder.modes
    if len(labels) < 3:
        return None, encoder.modes
    log.info("training the softmax baseline and a zero-shot head without %s on %s", ", ".join(wanted),
             encoder.manifest.data.labelled)
    records = [r for r in labelled(list_images(encoder.manifest.data.labelled)) if r.label in labels]
    records, features, _ = _features(records, encoder, cache)
    label_ids = np.asarray([labels.index(r.label) for r in records])
    config = _head_config(encoder)
    train_rows, val_rows = split(label_ids, stored.val_fraction, config.seed)
    targets = quality.label_matrix(labels, encoder.rows, encoder.word_vectors)
    extras = quality.train_extras(features, label_ids, labels, targets, train_rows, val_rows, config,
                                  cache / "ray-train", wanted)
    zs_rows = quality.zero_shot_rows(label_ids, val_rows, labels, wanted)
    chosen, _ = quality.choose(encoder.modes, labels, _vocabulary(encoder),
                               quality.Photos(features[val_rows], label_ids[val_rows]), extras,
                               quality.Photos(features[zs_rows], label_ids[zs_rows]))
    # only the zero-shot parameters change with the held-out labels; the artifact's modes stay as chosen
    zero_shot = chosen.params.chosen_on["zero_shot"]
    return extras, encoder.modes.with_params(gamma=chosen.params.gamma,
                                             chosen_on={**encoder.modes.params.chosen_on, "zero_shot": zero_shot})


def evaluate(artifacts: str | Path, data: str | Path, cache: str | Path = ".cache",
             held_out: list[str] | None = None, out: str | Path | None = None,
             open_data: str | Path | None = None, real_zero_shot: bool = True) -> dict:
    """The quality report (batch/quality.py) of the artifact on the labelled images of `data`, and with
    `open_data` the open-vocabulary figures on its real photos (batch/evaluate_open.py)."""
    started = time.perf_counter()
    cache = Path(cache)
    encoder = EncoderCore(artifacts)
    labels = encoder.manifest.labels
    records = labelled(list_images(data))
    records, features, unreadable = _features(records, encoder, cache)
    extras, modes = _extras(encoder, cache, held_out)
    truths = [r.label for r in records]
    result = quality.report(modes, features, truths, labels, _vocabulary(encoder), extras, ids=[r.id for r in records])
    default = result["default_mode"]
    result.update(artifact=encoder.version, data=str(data), unreadable=unreadable,
                  not_a_label=sum(t not in labels for t in truths),
                  # the default mode's headline figures, under the names earlier reports used
                  label_hit1=result["flat"][default]["hit1"], **result["tags"][default])
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        keep = [i for i, t in enumerate(truths) if t in labels]
        vectors = {mode: modes.embed(features[keep], mode) for mode in MODES}
        quality.gallery(out / "gallery.html", vectors, [records[i].path for i in keep], [records[i].id for i in keep],
                        [truths[i] for i in keep], encoder.rows, encoder.word_vectors)
        result["gallery"] = str(out / "gallery.html")
        if extras is not None:  # the same page for the head that never saw the held-out labels
            seen = [label for label in labels if label not in extras.held_out]
            zero_shot = modes.with_head(extras.zero_shot, quality.label_matrix(seen, encoder.rows, encoder.word_vectors))
            beta = result["zero_shot"]["beta"]
            vectors = {mode: zero_shot.embed(features[keep], mode, beta=beta) for mode in MODES}
            queries = [c for c, relevant in quality.CONCEPTS.items() if set(relevant) <= set(extras.held_out)][:4]
            quality.gallery(out / "gallery-zero-shot.html", vectors, [records[i].path for i in keep],
                            [records[i].id for i in keep], [truths[i] for i in keep], encoder.rows,
                            encoder.word_vectors, queries, title=f"head trained without {', '.join(extras.held_out)}")
            result["gallery_zero_shot"] = str(out / "gallery-zero-shot.html")
    if open_data:
        result["open_vocabulary"] = _open(encoder, modes, open_data, cache, out, real_zero_shot)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _open(encoder: EncoderCore, modes, open_data: str | Path, cache: Path, out: Path | None,
          real_zero_shot: bool) -> dict:
    photos = evaluate_open.photos_of(open_data, lambda records: _features(records, encoder, cache))
    if photos is None:
        raise ValueError(f"{open_data}: no readable labelled photos")
    broad = evaluate_open.broad_queries(photos, wordnet.load(), encoder.rows)
    block = evaluate_open.open_vocabulary(modes, photos, encoder.rows, encoder.word_vectors, broad)
    block["data"] = str(open_data)
    default = modes.params.default
    block["mixed_queries"] = evaluate_mixed.mixed_queries(modes.embed(photos.features, default), photos, encoder.rows,
                                                          encoder.word_vectors, modes.expand, default)
    block["mixed_queries"]["classes"] = evaluate_mixed.class_agreement(modes, photos.features)
    if real_zero_shot:
        config = _head_config(encoder)
        block["real_zero_shot"] = evaluate_open.real_zero_shot(modes, photos, encoder.rows, encoder.word_vectors,
                                                               config, cache / "ray-train")
    if out:
        block["gallery"] = evaluate_open.galleries(Path(out), modes, photos, encoder.rows, encoder.word_vectors)
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", default=os.environ.get("ARTIFACTS", "artifacts"))
    parser.add_argument("--data", required=True, help="labelled images, one sub-folder per label")
    parser.add_argument("--cache", default=os.environ.get("CACHE", ".cache"), help="feature cache (shared with batch-train)")
    parser.add_argument("--held-out", default=None,
                        help="comma-separated labels for the zero-shot run (default: the artifact's, cat,truck)")
    parser.add_argument("--out", default=None, help="folder for eval.json, eval.md and gallery.html "
                                                    "(default: CACHE/eval)")
    parser.add_argument("--json", default=None, help="write the JSON report here too")
    parser.add_argument("--open-data", default=os.environ.get("OPEN_DATA") or open_vocab.default_folder(),
                        help="labelled real photos for the open-vocabulary figures (default: ../shared/data/imagenet200 "
                             "if present; 'none' to skip)")
    parser.add_argument("--no-real-zero-shot", action="store_true",
                        help="skip training a head on the open folder's validation half")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from batch.train import ray_options

    if not ray.is_initialized():
        ray.init(**ray_options(),
                 include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)
    out = Path(args.out or Path(args.cache) / "eval")
    try:
        held_out = [x.strip() for x in args.held_out.split(",") if x.strip()] if args.held_out else None
        open_data = None if args.open_data in (None, "", "none") else args.open_data
        result = evaluate(args.artifacts, args.data, args.cache, held_out, out, open_data, not args.no_real_zero_shot)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    finally:
        ray.shutdown()
    text = json.dumps(result, indent=2)
    (out / "eval.json").write_text(text)
    table = quality.markdown(result)
    if "open_vocabulary" in result:
        block = result["open_vocabulary"]
        table += evaluate_open.markdown(block, block.get("real_zero_shot")) + evaluate_mixed.markdown(block["mixed_queries"])
    (out / "eval.md").write_text(table)
    if args.json:
        Path(args.json).write_text(text)
    print(table)
    galleries = [result.get("gallery"), result.get("gallery_zero_shot"),
                 result.get("open_vocabulary", {}).get("gallery")]
    print(f"JSON: {out / 'eval.json'}; table: {out / 'eval.md'}; galleries: {', '.join(g for g in galleries if g)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
