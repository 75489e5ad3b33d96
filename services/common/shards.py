"""A sharded image index: which shard holds an id, and the global top k of the shards' answers."""

from __future__ import annotations

import heapq
import itertools
import zlib
from typing import Callable, Iterable, TypeVar

SHARD_DIR = "shard-{}"  # one folder per shard under an artifact's indexes/images/

Hit = TypeVar("Hit")


def shard_of(item_id: str, shards: int) -> int:
    """The shard an item lives in: a stable hash of its id, so adds land where lookups go."""
    return zlib.crc32(item_id.encode("utf-8")) % shards


def merge(hit_lists: Iterable[Iterable[Hit]], k: int, score_and_id: Callable[[Hit], tuple[float, str]]) -> list[Hit]:
    """The global top k of per-shard top-k lists, best first, ties by id (exact when each list is exact)."""
    return heapq.nlargest(k, itertools.chain.from_iterable(hit_lists), key=score_and_id)
