"""Stage 4: publish a staged artifact: manifest with checksums, atomic rename, `current` link swap."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from services.common import artifact

log = logging.getLogger(__name__)

KEEP_VERSIONS = 3


def link_or_copy(source: Path, destination: Path) -> None:
    """`destination` as a hard link to `source` where the file system allows, else a copy."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def new_staging(root: Path) -> Path:
    """A fresh hidden folder inside `root`, on the same file system, so publishing is one rename."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=root))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != artifact.MANIFEST
    }


def publish(staging: Path, root: Path, manifest: artifact.Manifest) -> Path:
    """Write the manifest (with its version and checksums), move `staging` to `root/<version>`, then point
    `root/current` at it."""
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    artifact.write_manifest(staging, replace(manifest, version=version, files=checksums(staging)))
    _fsync_tree(staging)
    final = root / version
    os.rename(staging, final)
    link = root / f".{artifact.CURRENT}-{version}"
    os.symlink(version, link)
    os.replace(link, root / artifact.CURRENT)
    artifact.fsync(root)
    log.info("published %s", final)
    _prune(root, keep=KEEP_VERSIONS)
    return final


def verify(version_dir: Path) -> list[str]:
    """Files whose checksum differs from the manifest's (empty when the artifact is intact)."""
    manifest = artifact.read_manifest(version_dir)
    actual = checksums(version_dir)
    return sorted(name for name in set(manifest.files) | set(actual)
                  if manifest.files.get(name) != actual.get(name))


def _prune(root: Path, keep: int) -> None:
    current = (root / artifact.CURRENT).resolve().name
    versions = sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                      and (p / artifact.MANIFEST).is_file())
    for old in versions[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".staging-*"):
        if time.time() - stale.stat().st_mtime > 24 * 3600:
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            artifact.fsync(path)
    artifact.fsync(directory)
