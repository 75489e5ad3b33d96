"""The rows of an index's `items.jsonl` in an artifact: an id and, for images, the file, its label and
when it was taken (services/common/taken.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    id: str
    path: str = ""
    label: str | None = None
    taken: float | None = None  # seconds since 1970


def item_to_dict(item: Item) -> dict:
    data = {"id": item.id}
    if item.path:
        data["path"] = item.path
    if item.label is not None:
        data["label"] = item.label
    if item.taken is not None:
        data["taken"] = item.taken
    return data


def write_items(path: Path, items: list[Item]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item_to_dict(item), ensure_ascii=False) + "\n")


def read_items(path: Path) -> list[Item]:
    with open(path, encoding="utf-8") as handle:
        return [Item(**json.loads(line)) for line in handle]
