"""Progress of a long batch stage (feature extraction): a tqdm bar on a terminal, else a log line every
few seconds; both say how many images are done, images/s and about how long is left."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

LOG_EVERY_SECONDS = 5.0


def duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `1 h 05 min`."""
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`update(n)` as images are done; on a terminal (`stream.isatty()`) a bar, otherwise `log` gets
    "<what> 120/500 images (24.0 images/s, about 16 s left)" every `every` seconds and at the end."""

    def __init__(self, total: int, what: str, log: logging.Logger, stream: TextIO | None = None,
                 every: float = LOG_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.log, self.every, self.clock = total, what, log, every, clock
        stream = stream or sys.stderr
        self.bar = (tqdm(total=total, desc=what, unit=" images", file=stream, dynamic_ncols=True, smoothing=0.1)
                    if stream.isatty() else None)
        self.done = 0
        self.started = self.last_line = clock()

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = self.clock()
        if now - self.last_line >= self.every or self.done >= self.total:
            rate = self.done / max(now - self.started, 1e-9)
            self.log.info("%s %d/%d images (%.1f images/s, about %s left)", self.what, self.done, self.total, rate,
                          duration((self.total - self.done) / max(rate, 1e-9)))
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
