"""List the images of a folder: ImageFolder layout (labels from sub-folders) or flat."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from services.common.folder import folder_files


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
    """Every non-hidden file below `root`, sorted, named as services/common/folder.py names them (so the
    folder watcher agrees); unreadable ones are found (and reported) later."""
    return [ImageRecord(f.id, f.path, f.label) for f in folder_files(root)]


def labelled(records: list[ImageRecord]) -> list[ImageRecord]:
    return [record for record in records if record.label is not None]
