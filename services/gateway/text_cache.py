"""Text queries' vectors, kept by query and artifact version.

A text query's vector depends on nothing but its text and the artifact version that embedded it, so a
hit is exactly what the encoder would answer: the gateway then calls only the index. Which version is
current comes from the encoder: from each answer it gives, and from the gateway's health watcher, which
asks every second; after a switch a cached vector of the old version goes with the old version to the
index (which answers for the version before), until the watcher has seen the new one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_SIZE = 10_000  # queries; each keeps the encoder's answer, about 4 bytes a dimension (300-d: ~1.5 KB)


class TextVectorCache:
    """At most `size` (query, version) -> vector, least recently used out first; size 0 keeps nothing."""

    def __init__(self, size: int = DEFAULT_SIZE):
        if size < 0:
            raise ValueError(f"text cache size must be >= 0, not {size}")
        self.size = size
        self.current = ""  # the version the encoder served when last heard from
        self._vectors: OrderedDict[tuple[str, str], Sequence[float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str, version: str = "") -> tuple[Sequence[float], str] | None:
        """(vector, its version) for `version`, or for the current one when empty; None when not kept."""
        version = version or self.current
        if not self.size or not version:
            return None
        with self._lock:
            vector = self._vectors.get((text, version))
            if vector is None:
                return None
            self._vectors.move_to_end((text, version))
        return vector, version

    def put(self, text: str, version: str, vector: Sequence[float]) -> None:
        if not self.size:
            return
        with self._lock:
            self._vectors[(text, version)] = vector
            self._vectors.move_to_end((text, version))
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)

    def __len__(self) -> int:
        return len(self._vectors)
