"""Keep a folder and the collection in step: photos copied in are added, changed ones replaced, removed
ones deleted, through the gateway's live AddImages/DeleteImages (no restart, no batch job).

Ids are what `make index` gives the same files (services/common/folder.py: the path relative to the
folder, label the top-level sub-folder), so a later `make index` of the folder agrees with it.

- Events come from watchfiles (inotify and the like); each burst of them (until `step_ms` pass quiet, at
  most `debounce_ms`) becomes one DeleteImages and one AddImages call (64 images or 12 MiB at most each).
  What a path is now decides what is done, not the event's kind: a path that exists is added (a folder:
  every file below it), one that is gone is deleted (a folder: every id below it).
- At start, and every `rescan_seconds` after, the folder is reconciled with the index (ListImages): the
  index's images of this folder (their files lie under it, or they were added under a relative-path id)
  against the files present. A rescan also sees files whose size or time changed since the last look,
  so a network file system, whose changes raise no events, stays in step within one rescan.
- A file the encoder refuses (not an image, or half-written) is logged and tried again once its size or
  time changes; a gateway that is down is retried on the next round, with nothing lost.

`python -m services.gateway.watch DIR` (also `semsearch-index --watch DIR`, `make watch INDEX_DATA=DIR`)
needs only the services' dependencies and watchfiles.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import watchfiles

from services.common import bounds, security
from services.common.folder import FolderFile, file_of, folder_files
from services.common.ids import is_image_id, stored_copy_name, stored_name
from services.gateway.client import DEFAULT_ADDRESS, Client, ImageHit

log = logging.getLogger(__name__)

RESCAN_SECONDS = 60.0
DEBOUNCE_MS = 1000  # the longest a burst of events is collected before it is applied
STEP_MS = 200  # a burst ends once this long passes without a new event
WAKE_MS = 1000  # the loop wakes at least this often (rescans, retries, stop)
MAX_CALL_BYTES = 12 * 2**20  # image bytes per AddImages call, under the 16 MiB message limit
MAX_DELETE_IDS = 1000

Stat = tuple[int, int]  # (size, mtime_ns): a file is taken to have changed when this does


def stat_of(path: str) -> Stat | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


@dataclass
class Changes:
    add: dict[str, FolderFile] = field(default_factory=dict)  # id -> the file to add (new or changed)
    delete: set[str] = field(default_factory=set)

    def added(self, file: FolderFile) -> None:
        self.delete.discard(file.id)
        self.add[file.id] = file

    def deleted(self, item_id: str) -> None:
        self.add.pop(item_id, None)
        self.delete.add(item_id)


class FolderWatcher:
    """Follows one folder for one gateway client; `run(stop)` until `stop` is set."""

    def __init__(self, client: Client, folder: str | Path, rescan_seconds: float = RESCAN_SECONDS,
                 debounce_ms: int = DEBOUNCE_MS, step_ms: int = STEP_MS, force_polling: bool | None = None):
        self.client = client
        self.root = Path(folder).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder to watch not found: {self.root}")
        self.rescan_seconds = rescan_seconds
        self.debounce_ms, self.step_ms, self.force_polling = debounce_ms, step_ms, force_polling
        self.known: dict[str, Stat] = {}  # ids the index holds from this folder -> the file's stat when last seen
        self.refused: dict[str, Stat] = {}  # files the gateway refused, until their stat changes
        self.pending = Changes()
        self.ready = threading.Event()  # set once the first reconcile has been applied
        self.next_rescan = 0.0
        self.failing = False
        self.applied = {"added": 0, "deleted": 0, "refused": 0}

    def run(self, stop: threading.Event) -> None:
        log.info("watching %s (rescan every %s s)", self.root, self.rescan_seconds or "never")
        for events in watchfiles.watch(self.root, watch_filter=None, debounce=self.debounce_ms, step=self.step_ms,
                                       stop_event=stop, rust_timeout=WAKE_MS, yield_on_timeout=True,
                                       raise_interrupt=False, force_polling=self.force_polling):
            self.note(path for _, path in events)
            self.round()

    def round(self) -> None:
        """One pass: a reconcile when one is due, then the pending changes applied."""
        try:
            if time.monotonic() >= self.next_rescan:
                self.reconcile()
            self.apply()
        except grpc.RpcError as error:
            if not self.failing:  # once per outage, not every second
                log.warning("gateway %s: %s; the changes wait and are tried again every second",
                            error.code().name, error.details())
            self.failing = True
            return
        if self.failing:
            log.info("the gateway answers again; pending changes applied")
            self.failing = False
        if not self.ready.is_set():
            log.info("in step: the index holds the %d images of %s; watching for changes", len(self.known), self.root)
            self.ready.set()

    def reconcile(self) -> None:
        """Pending: files the index lacks or that changed, and images of this folder whose file is gone."""
        files = {f.id: f for f in folder_files(self.root)}
        held = {hit.id: hit for hit in self.client.all_images() if self._from_here(hit)}
        for item_id, file in files.items():
            if item_id not in held or self._changed(file, held[item_id]):
                self.pending.added(file)
            else:
                self.known[item_id] = stat_of(file.path)
        for item_id in held.keys() - files.keys():
            self.known[item_id] = (0, 0)
            self.pending.deleted(item_id)
        self.next_rescan = time.monotonic() + self.rescan_seconds if self.rescan_seconds else float("inf")
        log.info("reconciled %s: %d files, the index holds %d of them; %d to add, %d to delete",
                 self.root, len(files), len(held), len(self.pending.add), len(self.pending.delete))

    def _from_here(self, hit: ImageHit) -> bool:
        """An image of this folder: its file lies under it, or it was added under a relative-path id."""
        return file_of(self.root, Path(hit.path)) is not None or (
            stored_copy_name(hit.path) is not None and not is_image_id(hit.id))

    def _changed(self, file: FolderFile, hit: ImageHit) -> bool:
        seen = self.known.get(file.id)
        if seen is not None:
            return stat_of(file.path) != seen
        copy = stored_copy_name(hit.path)
        if copy is None:  # indexed where it lies, by make index: that job re-extracts a changed file
            return False
        try:
            return stored_name(file.id, Path(file.path).read_bytes()) != copy
        except OSError:
            return False

    def note(self, paths) -> None:
        """What the paths are now: a file or folder to add, or ids to delete."""
        for text in paths:
            path = Path(text)
            if file_of(self.root, path) is None:
                continue
            if path.is_dir():
                for inner in folder_files(path):
                    self.pending.added(file_of(self.root, Path(inner.path)))
            elif path.is_file():
                self.pending.added(file_of(self.root, path))
            else:
                gone = file_of(self.root, path).id
                for item_id in [i for i in self.known if i == gone or i.startswith(gone + "/")]:
                    self.pending.deleted(item_id)

    def apply(self) -> None:
        """The pending deletes, then the adds, in as few calls as the limits allow."""
        deletes = sorted(i for i in self.pending.delete if i in self.known)
        for start in range(0, len(deletes), MAX_DELETE_IDS):
            self._delete(deletes[start:start + MAX_DELETE_IDS])
        self.pending.delete.clear()
        for batch in self._add_batches():
            self._add(batch)

    def _delete(self, ids: list[str]) -> None:
        try:
            self.client.delete_images(ids)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            for item_id in ids:  # someone deleted some already: the rest one by one
                self._delete_one(item_id)
        for item_id in ids:
            self.known.pop(item_id, None)
        self.applied["deleted"] += len(ids)
        log.info("deleted %d: %s", len(ids), _some(ids))

    def _delete_one(self, item_id: str) -> None:
        try:
            self.client.delete_images([item_id])
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise

    def _add_batches(self):
        """Batches of (file, bytes, stat) of the pending adds that need adding, within the call limits."""
        batch, size = [], 0
        for item_id, file in sorted(self.pending.add.items()):
            stat = stat_of(file.path)
            if stat is None or stat == self.known.get(item_id) or stat == self.refused.get(item_id):
                del self.pending.add[item_id]  # gone (its delete follows), unchanged, or refused as it is
                continue
            data = _read(file.path)
            if data is None:
                del self.pending.add[item_id]
                continue
            if batch and (len(batch) == bounds.MAX_IMAGES or size + len(data) > MAX_CALL_BYTES):
                yield batch
                batch, size = [], 0
            batch.append((file, data, stat))
            size += len(data)
        if batch:
            yield batch

    def _add(self, batch: list[tuple[FolderFile, bytes, Stat]]) -> None:
        try:
            self.client.add_images([d for _, d, _ in batch], [f.label for f, _, _ in batch], [f.id for f, _, _ in batch])
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise
            if len(batch) > 1:  # one bad file must not keep the others out
                for one in batch:
                    self._add([one])
                return
            file, _, stat = batch[0]
            self.refused[file.id] = stat
            self.pending.add.pop(file.id, None)
            self.applied["refused"] += 1
            log.warning("not added: %s (%s: %s); tried again once the file changes", file.path,
                        error.code().name, error.details())
            return
        for file, _, stat in batch:
            self.known[file.id] = stat
            self.refused.pop(file.id, None)
            self.pending.add.pop(file.id, None)
        self.applied["added"] += len(batch)
        log.info("added %d: %s", len(batch), _some([f.id for f, _, _ in batch]))


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _some(ids: list[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=os.environ.get("SEMSEARCH_GATEWAY", DEFAULT_ADDRESS),
                        help=f"gateway address (default: $SEMSEARCH_GATEWAY or {DEFAULT_ADDRESS})")
    parser.add_argument("--rescan-seconds", type=float, default=RESCAN_SECONDS,
                        help=f"reconcile the whole folder this often, for file systems without change events "
                             f"(network ones); 0: only at start (default {RESCAN_SECONDS:.0f})")
    parser.add_argument("--token", default=os.environ.get("SEMSEARCH_TOKEN"),
                        help="bearer token for a gateway that requires one (default: $SEMSEARCH_TOKEN)")
    security.add_client_tls_arguments(parser, env_prefix="SEMSEARCH_", what="the gateway")


def watch(folder: Path, args: argparse.Namespace) -> int:
    """Follow `folder` until SIGINT or SIGTERM; exit status 2 for a missing folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = security.or_exit("semsearch-index", security.client_tls_from_args, args)
    with Client(args.gateway, tls=tls, token=args.token) as client:
        try:
            watcher = FolderWatcher(client, folder, args.rescan_seconds)
        except FileNotFoundError as error:
            log.error("%s", error)
            return 2
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        watcher.run(stop)
    log.info("stopped watching %s: %s", folder, watcher.applied)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the folder to keep in step with the collection")
    add_watch_arguments(parser)
    args = parser.parse_args(argv)
    return watch(args.folder, args)


if __name__ == "__main__":
    sys.exit(main())
