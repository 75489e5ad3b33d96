"""List the images of a folder: ImageFolder layout (labels from sub-folders) or flat."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageRecord:
    id: str  # path relative to the folder, with '/' separators
    path: str  # absolute path
    label: str | None  # the top-level sub-folder's name; None for files directly in the folder

    def cache_key(self, backbone: str) -> str:
        """Changes when the file changes (size or mtime) or the backbone does."""
        stat = os.stat(self.path)
        text = f"{backbone}\0{self.path}\0{stat.st_size}\0{stat.st_mtime_ns}"
        return hashlib.sha1(text.encode()).hexdigest()


def list_images(root: str | Path) -> list[ImageRecord]:
    """Every non-hidden file below `root`, sorted; unreadable ones are found (and reported) later."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    records = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            relative = path.relative_to(root)
            label = relative.parts[0] if len(relative.parts) > 1 else None
            records.append(ImageRecord(relative.as_posix(), str(path), label))
    return records


def labelled(records: list[ImageRecord]) -> list[ImageRecord]:
    return [record for record in records if record.label is not None]
