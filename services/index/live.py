"""Live updates of the image index: the artifact's index with the live log (live_log.py) applied.

The log is the truth: an index service applies it on top of the artifact it loads (at start, on
every artifact switch, and each time it polls, which also keeps replicas in step), and batch-train
folds it into the next artifact. Applying is idempotent and in log order, so replaying the whole
log over any artifact version gives the same membership as the last operation on each id.

An added image's id is its content id (`added/<sha256 prefix>`) or one the caller gave (a path, as a
watched folder names its files). An add of a given id the artifact already holds replaces it, unless
the artifact's image is the very copy the add stored (batch-train or make index folded that add in,
and embedded it with the artifact's own model).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np

from services.common import bounds
from services.common.errors import listed, quoted
from services.common.ids import ID_PREFIX, image_id, is_image_id, path_id_problem
from services.common.items import Item
from services.common.taken import taken
from services.common.shards import shard_of
from services.index.core import (
    FEATURE_CHUNK, FeatureChunks, Hit, InvalidQuery, UnknownId, check_k, check_min_score, first_by_id, merge,
    unit_features, unit_query,
)
from services.index.selection import EVERYTHING, Selection
from services.index.live_log import (  # noqa: F401  (re-exported: the log's names are part of this module's API)
    IMAGES_DIR, LIVE_DIR, LOCK_NAME, LOG_NAME, Entry, LiveLog, image_file, live_dir, membership,
)

log = logging.getLogger(__name__)

COMPACT_AFTER_LINES = 10_000  # compact once the log is this long and at least half of it is superseded


@dataclass(frozen=True)
class _Delta:
    """One immutable state of the live changes: readers take it whole, writers replace it."""

    items: tuple[Item, ...]
    vectors: np.ndarray
    rows: dict[str, int]
    deleted: frozenset[str]  # the artifact's own images left out: deleted, or replaced by an item above
    features: np.ndarray  # float16 unit backbone features in the rows of `items`; zeros where none
    with_features: np.ndarray  # bool per row: it has them


class LiveImages:
    """An artifact's image index (or one shard of it) with the live log applied on top.

    Added images live in a small exact delta searched beside ScaNN; deleted ones are left out of
    every answer. Readers see immutable snapshots, so searches never take the lock.
    """

    def __init__(self, base, artifact_root: Path, space: str, shard: tuple[int, int] | None = None,
                 backbone: str = ""):
        """`space`: the artifact's word space; `backbone`: its backbone (artifact.Backbone.identity), whose
        features an added image's must be to be compared with the artifact's."""
        self.base = base
        self.name = base.name
        self.config = base.config
        self.space = space
        self.backbone = backbone
        self.shard = shard
        self.log = LiveLog(artifact_root)
        self._lock = threading.Lock()
        self._inode: int | None = None
        self._offset = 0
        self._reset()
        self.refresh()

    def _reset(self) -> None:
        """Back to the artifact alone (before the first read, and when a compaction replaced the log)."""
        self._delta = _Delta((), np.zeros((0, self.base.dimension), dtype=np.float32), {}, frozenset(),
                             np.zeros((0, self.feature_dimension), np.float16), np.zeros(0, bool))
        self.pending: set[str] = set()  # added in another word space: searchable after the next batch-train
        self._files: dict[str, str] = {}  # stored bytes of each added id
        self._lines, self._ids = 0, set()  # log lines read, and the ids they name: when to compact

    @property
    def dimension(self) -> int:
        return self.base.dimension

    @property
    def feature_dimension(self) -> int:
        return self.base.feature_dimension

    def __len__(self) -> int:
        delta = self._delta
        return len(self.base) - sum(self._in_base(i) for i in delta.deleted) + len(delta.items)

    def _in_base(self, item_id: str) -> bool:
        try:
            self.base.vector_of(item_id)
            return True
        except UnknownId:
            return False

    def contains(self, item_id: str) -> bool:
        delta = self._delta
        return item_id in delta.rows or (item_id not in delta.deleted and self._in_base(item_id))

    def _folded_in(self, entry: Entry) -> bool:
        """Whether the artifact holds this add already: a content id it holds, or an image whose file
        is the copy this add stored."""
        try:
            path = self.base.item_of(entry.id).path
        except UnknownId:
            return False
        return is_image_id(entry.id) or Path(path).name == Path(entry.file).name

    def refresh(self) -> int:
        """Apply what the log gained since the last call; returns how many entries that was."""
        with self._lock:
            got = self.log.read_from(self._inode, self._offset)
            if got.restarted:
                self._reset()
            mine = [e for e in got.entries if self.shard is None or shard_of(e.id, self.shard[1]) == self.shard[0]]
            if mine or got.restarted:
                self._apply(mine)
            self._lines += len(got.entries)
            self._ids.update(e.id for e in got.entries)
            self._inode, self._offset = got.inode, got.offset  # only once applied: a failure re-reads them
            return len(mine)

    def _compact_if_due(self) -> None:
        if self._lines > COMPACT_AFTER_LINES and self._lines > 2 * len(self._ids):
            self.log.compact()
            self.refresh()

    def _apply(self, entries: list[Entry]) -> None:
        delta = self._delta
        added = {item.id: (item, delta.vectors[row], delta.features[row] if delta.with_features[row] else None)
                 for row, item in enumerate(delta.items)}
        deleted = set(delta.deleted)
        for entry in entries:
            if entry.op == "delete":
                added.pop(entry.id, None)
                self.pending.discard(entry.id)
                self._files.pop(entry.id, None)
                if self._in_base(entry.id):  # only the artifact's own images need hiding
                    deleted.add(entry.id)
                continue
            self._files[entry.id] = entry.file
            added.pop(entry.id, None)
            self.pending.discard(entry.id)
            if self._folded_in(entry):
                deleted.discard(entry.id)
                continue  # the artifact already holds it, embedded by its own model
            if self._in_base(entry.id):
                deleted.add(entry.id)  # replaced: the artifact's image of this id is left out
            if entry.space != self.space or len(entry.vector) != self.dimension:
                self.pending.add(entry.id)
                continue
            path = str(self.log.directory / entry.file)
            added[entry.id] = (Item(entry.id, path, entry.label, taken(path)), np.asarray(entry.vector, dtype=np.float32),
                               self._features_of(entry))
        items = tuple(item for item, _, _ in added.values())
        vectors = (np.stack([vector for _, vector, _ in added.values()]) if added
                   else np.zeros((0, self.dimension), dtype=np.float32))
        found = [features for _, _, features in added.values()]
        features = np.zeros((len(items), self.feature_dimension), np.float16)
        with_features = np.asarray([row is not None for row in found], bool)
        if with_features.any():
            features[with_features] = np.stack([row for row in found if row is not None])
        self._delta = _Delta(items, vectors, {item.id: row for row, item in enumerate(items)}, frozenset(deleted),
                             features, with_features)
        if self.pending:
            log.warning("%d added images were embedded in another word space than %s; "
                        "they become searchable after the next batch-train", len(self.pending), self.space)

    def _features_of(self, entry: Entry) -> np.ndarray | None:
        """An added image's features, when its backbone is the artifact's (else it is left out of duplicates)."""
        if not entry.features or entry.backbone != self.backbone or len(entry.features) != 2 * self.feature_dimension:
            return None
        return np.frombuffer(entry.features, dtype="<f2")

    def add(self, images: list[tuple]) -> list[str]:
        """(id, bytes, vector, label) or (id, bytes, vector, label, backbone features) each: checked,
        stored, logged durably, applied; returns the ids. An image without features is left out of
        near-duplicate search until the next batch-train."""
        images = [(*image, None) if len(image) == 4 else tuple(image) for image in images]
        for item_id, data, vector, label, features in images:
            check_new_image(item_id, data, vector, self.dimension, label)
            check_features(features, self.feature_dimension)
            self._check_shard(item_id)
        entries = [Entry("add", item_id, label, image_file(data, item_id),
                         tuple(float(v) for v in unit_query(vector, self.dimension)), self.space,
                         *self._features_entry(features))
                   for item_id, data, vector, label, features in images]
        replaced = [self._files[e.id] for e in entries if self._files.get(e.id, e.file) != e.file and not is_image_id(e.id)]
        self.log.append(entries, images=[image[1] for image in images], remove=replaced)
        self.refresh()
        self._compact_if_due()
        return [entry.id for entry in entries]

    def delete(self, ids: list[str]) -> int:
        """Delete every id, or none: UnknownId names those not in the index."""
        unknown = [item_id for item_id in ids if not self.contains(item_id)]
        if unknown:
            raise UnknownId(f"no image {listed(unknown, 5)} in index {self.name!r}; nothing deleted")
        for item_id in ids:
            self._check_shard(item_id)
        unique = list(dict.fromkeys(ids))
        # the bytes of deleted added images go with them (under the log's lock, after the delete is durable)
        self.log.append([Entry("delete", item_id) for item_id in unique],
                        remove=[self._files[i] for i in unique if i in self._files])
        self.refresh()
        self._compact_if_due()
        return len(unique)

    def _check_shard(self, item_id: str) -> None:
        if self.shard is not None and shard_of(item_id, self.shard[1]) != self.shard[0]:
            raise InvalidQuery(f"image {quoted(item_id)} belongs to shard {shard_of(item_id, self.shard[1])} "
                               f"of {self.shard[1]}, not to this one ({self.shard[0]})")

    def vector_of(self, item_id: str) -> np.ndarray:
        delta = self._delta
        row = self._added_row(delta, item_id)
        return self.base.vector_of(item_id) if row is None else delta.vectors[row]

    def item_of(self, item_id: str) -> Item:
        delta = self._delta
        row = self._added_row(delta, item_id)
        return self.base.item_of(item_id) if row is None else delta.items[row]

    def _added_row(self, delta, item_id: str) -> int | None:
        """The row of a live-added image in `delta`; None for the artifact's own; UnknownId once deleted."""
        row = delta.rows.get(item_id)
        if row is None and item_id in delta.deleted:
            raise UnknownId(f"no item {quoted(item_id)} in index {self.name!r} (it was deleted)")
        return row

    def _features_entry(self, features) -> tuple[bytes, str]:
        if features is None or not len(features) or not self.feature_dimension:
            return b"", ""
        return unit_features(features).astype("<f2").tobytes(), self.backbone

    def feature_chunks(self, folder: str = "", size: int = FEATURE_CHUNK) -> FeatureChunks:
        """The artifact's features (deleted images left out), then those of the images added since, under
        `folder` (a folder_prefix); NoFeatures when the artifact has none."""
        delta = self._delta
        base = self.base.feature_chunks(folder, delta.deleted, size)
        rows = [row for row, item in enumerate(delta.items) if delta.with_features[row] and item.id.startswith(folder)]
        added = (([delta.items[row] for row in rows[start:start + size]], delta.features[rows[start:start + size]])
                 for start in range(0, len(rows), size))
        return (chunk for part in (base, added) for chunk in part)

    def without_features(self, folder: str = "") -> int:
        """Images added live under `folder` whose features are missing (or from another backbone)."""
        delta = self._delta
        return sum(1 for row, item in enumerate(delta.items) if not delta.with_features[row] and item.id.startswith(folder))

    def search(self, query, k: int, min_score: float | None = None, exclude: Collection[str] = (),
               selection: Selection = EVERYTHING) -> list[Hit]:
        check_k(k)
        check_min_score(min_score)
        delta = self._delta
        hidden = _Either(delta.deleted, exclude) if exclude else delta.deleted  # no per-query copy of the deletes
        base_hits = self.base.search(query, k, min_score, hidden, selection)
        if not delta.items:
            return base_hits
        scores = (delta.vectors @ unit_query(query, self.dimension)).tolist()
        delta_hits = [Hit(item, score) for item, score in zip(delta.items, scores)
                      if item.id not in exclude and (min_score is None or score >= min_score)
                      and selection.keeps(item, score)]
        return merge([base_hits, delta_hits], k)


    def list_items(self, folder: str, after_id: str, limit: int) -> list[Item]:
        """At most `limit` items under `folder` with ids after `after_id`, sorted by id."""
        delta = self._delta
        kept, cursor = [], after_id
        while len(kept) < limit:
            page = self.base.list_items(folder, cursor, limit)
            kept += [item for item in page if item.id not in delta.deleted]
            if len(page) < limit:
                break
            cursor = page[-1].id
        added = sorted((item for item in delta.items if item.id.startswith(folder) and item.id > after_id),
                       key=lambda item: item.id)
        return first_by_id([kept, added], limit)


class _Either:
    """Membership in either of two collections, without building their union."""

    def __init__(self, first: Collection[str], second: Collection[str]):
        self.first, self.second = first, second

    def __contains__(self, item: object) -> bool:
        return item in self.first or item in self.second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)


def check_new_image(item_id: str, data: bytes, vector, dimension: int, label: str | None = None) -> None:
    """InvalidQuery unless the id is the bytes' content id or a valid given id (a relative path), the
    vector a finite one of the index's dimension and the label (if any) at most bounds.MAX_LABEL_CHARS long."""
    problem = bounds.label_problem(label)
    if problem:
        raise InvalidQuery(problem)
    if not data:
        raise InvalidQuery("an added image needs its bytes")
    if item_id.startswith(ID_PREFIX) and item_id != image_id(data):
        raise InvalidQuery(f"id {quoted(item_id)} is not the content id of the image bytes ({image_id(data)})")
    problem = None if item_id.startswith(ID_PREFIX) else path_id_problem(item_id)
    if problem:
        raise InvalidQuery(f"id {quoted(item_id)}: {problem}")
    unit_query(vector, dimension)


def check_features(features, dimension: int) -> None:
    """InvalidQuery unless `features` (if any) are finite and of the artifact's feature dimension. An
    artifact that keeps no features (dimension 0) ignores them."""
    if features is None or not len(features) or not dimension:
        return
    values = np.asarray(features, dtype=np.float32)
    if values.shape != (dimension,):
        raise InvalidQuery(f"an added image's features have {values.size} values; the artifact's backbone gives {dimension}")
    if not np.all(np.isfinite(values)):
        raise InvalidQuery("an added image's features contain NaN or infinity")
