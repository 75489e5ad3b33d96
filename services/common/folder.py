"""The files of a folder of photos and their ids, as `make index` and the folder watcher both name them:
every non-hidden file at any depth, its id the path relative to the folder ('/' separators), its label
the top-level sub-folder (None for a file directly in the folder)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FolderFile:
    id: str
    path: str  # absolute
    label: str | None


def file_of(root: Path, path: Path) -> FolderFile | None:
    """`path` (below the resolved `root`) as a folder file; None for a hidden one or one outside `root`."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None
    if not relative.parts or any(part.startswith(".") for part in relative.parts):
        return None
    return FolderFile(relative.as_posix(), str(path), relative.parts[0] if len(relative.parts) > 1 else None)


def folder_files(root: str | Path) -> list[FolderFile]:
    """Every non-hidden file below `root` (links followed), sorted by path."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                found.append(file_of(root, Path(directory) / name))
    return found
