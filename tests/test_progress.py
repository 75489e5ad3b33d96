"""Progress of feature extraction (plumbing: a clock the test moves, no Ray): log lines with images/s and
the time left when the output is not a terminal, a tqdm bar when it is."""

from __future__ import annotations

import io
import logging

import pytest

from batch.progress import Progress, duration

log = logging.getLogger("test.progress")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_run_without_a_terminal_logs_images_per_second_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    clock, stream = Clock(), io.StringIO()
    with Progress(500, "extracted", log, stream=stream, every=5.0, clock=clock) as progress:
        for _ in range(10):  # 50 images a second, 50 images each second
            clock.now += 1.0
            progress.update(50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["extracted 250/500 images (50.0 images/s, about 5 s left)",
                     "extracted 500/500 images (50.0 images/s, about 0 s left)"]
    assert stream.getvalue() == ""  # no bar


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    clock, terminal = Clock(), Terminal()
    with Progress(100, "extracted", log, stream=terminal, clock=clock) as progress:
        progress.update(100)
    assert "100/100" in terminal.getvalue() and "images/s" in terminal.getvalue()
    assert caplog.records == []


@pytest.mark.parametrize("seconds, text", [(44.6, "45 s"), (200, "3 min 20 s"), (3 * 3600 + 300, "3 h 05 min")])
def test_time_left_reads_like_a_person_says_it(seconds, text):
    assert duration(seconds) == text
