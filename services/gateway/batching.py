"""Searches that arrive together go downstream together: one call answers many.

Each downstream call costs the gateway and the index 0.7 to 0.9 ms of CPU each in Python gRPC,
whatever it carries (bench.gateway_floor; BENCHMARKS.md, "The floor under the gateway"). So while `max_in_flight` calls of one
kind are under way, further searches of that kind wait, and the first call to finish hands every
waiting search to one of them, which sends them all in one call. A search that finds a call slot
free is sent at once, alone: a quiet gateway adds no wait.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_IN_FLIGHT = 1  # chosen with bench.gateway_floor (BENCHMARKS.md, "Searches that arrive together")
MAX_BATCH = 64


@dataclass
class _Waiter(Generic[Item]):
    item: Item
    ready: threading.Event = field(default_factory=threading.Event)
    leads: bool = False  # set by a finished call: this waiter sends the next batch
    result: object = None
    error: BaseException | None = None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Kind:
    in_flight: int = 0
    waiting: deque = field(default_factory=deque)


class Coalescer(Generic[Item, Result]):
    """`submit(key, item)` answers `send(key, items)[position]`, where `items` are the searches of
    that key that waited for the same call; `send` raises for all of them at once."""

    def __init__(self, send: Callable[[Hashable, list[Item]], list[Result]],
                 max_in_flight: int = DEFAULT_IN_FLIGHT, max_batch: int = MAX_BATCH):
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError(f"max_in_flight and max_batch must be >= 1, not {max_in_flight} and {max_batch}")
        self.send = send
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._kinds: dict[Hashable, _Kind] = {}

    def submit(self, key: Hashable, item: Item) -> Result:
        me = _Waiter(item)
        with self._lock:
            kind = self._kinds.setdefault(key, _Kind())
            sends_now = kind.in_flight < self.max_in_flight  # then nothing waits: see _finish
            if sends_now:
                kind.in_flight += 1
            else:
                kind.waiting.append(me)
        if not sends_now:
            me.ready.wait()
            if not me.leads:
                return me.outcome()
        batch = [me]
        if me.leads:
            with self._lock:
                while kind.waiting and len(batch) < self.max_batch:
                    batch.append(kind.waiting.popleft())
        self._send(key, batch)
        self._finish(key, kind)
        for waiter in batch[1:]:
            waiter.ready.set()
        return me.outcome()

    def _send(self, key: Hashable, batch: list[_Waiter]) -> None:
        try:
            results = self.send(key, [waiter.item for waiter in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} answers for {len(batch)} searches")
            for waiter, result in zip(batch, results):
                waiter.result = result
        except BaseException as error:  # each waiting search raises it in its own thread
            for waiter in batch:
                waiter.error = error

    def _finish(self, key: Hashable, kind: _Kind) -> None:
        """This call's slot passes to the first waiting search, if any, which sends the rest with it."""
        with self._lock:
            if kind.waiting:
                next_leader = kind.waiting.popleft()
            else:
                next_leader = None
                kind.in_flight -= 1
                if not kind.in_flight:
                    del self._kinds[key]
        if next_leader is not None:
            next_leader.leads = True
            next_leader.ready.set()
