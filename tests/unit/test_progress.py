"""Progress bars (tqdm) of `apply --wait` and `bench`: on a terminal only. Redirected output
gets nothing progress-like (no carriage returns, no bars); a pseudo-terminal gets the bar."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import pytest

from audiences import cli
from audiences.adapters.stream import definitions
from audiences.progress import ProgressBar
from audiences.tools.bench.runner import _Progress


@pytest.fixture
def terminal() -> Iterator[tuple[TextIO, Callable[[], str]]]:
    """(a text stream on a pseudo-terminal, a function reading what reached the terminal)."""
    leader, follower = pty.openpty()
    # a terminal 100 columns wide (a new pseudo-terminal says 0 x 0)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    stream = os.fdopen(follower, "w", encoding="utf-8")

    # poll, not select: after the whole suite the process holds over 1,024 descriptors,
    # and select() refuses any numbered above that
    waiting = select.poll()
    waiting.register(leader, select.POLLIN)

    def read() -> str:
        stream.flush()
        chunks = []
        while waiting.poll(0):
            chunks.append(os.read(leader, 65536))
        return b"".join(chunks).decode()

    try:
        yield stream, read
    finally:
        stream.close()
        os.close(leader)


def _fake_backfill(
    monkeypatch: pytest.MonkeyPatch, reports: list[tuple[int, int, int, int]], ok: bool = True
) -> None:
    def wait(settings: Any, topics: Any, timeout_s: float, show: Any) -> bool:
        for report in reports:
            show(*report)
        return ok

    monkeypatch.setattr(definitions, "wait_for_backfill", wait)


REPORTS = [(0, 0, 0, 4), (250, 1000, 1, 4), (1000, 1000, 4, 4)]


def test_apply_wait_writes_no_progress_when_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_backfill(monkeypatch, REPORTS)
    assert cli._wait_for_backfill(None, None, 5.0) == 0  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert out == "backfill done: the audiences reflect the retained history\n"
    assert err == ""
    _fake_backfill(monkeypatch, REPORTS[:2], ok=False)
    assert cli._wait_for_backfill(None, None, 5.0) == 1  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    assert err == "error: backfill not finished after 5s (are workers running?)\n"


def test_apply_wait_draws_a_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    terminal: tuple[TextIO, Callable[[], str]],
) -> None:
    stream, read = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    _fake_backfill(monkeypatch, REPORTS)
    assert cli._wait_for_backfill(None, None, 5.0) == 0  # type: ignore[arg-type]
    shown = read()
    assert "\r" in shown and shown.startswith("\r")
    assert "backfill: 100%" in shown and "1000/1000" in shown
    assert "4/4 partitions done" in shown
    assert capsys.readouterr().out == "backfill done: the audiences reflect the retained history\n"


def test_a_bar_on_a_stream_that_is_not_a_terminal_writes_nothing() -> None:
    stream = io.StringIO()
    bar = ProgressBar("work", 10, stream=stream, min_interval_s=0)
    assert not bar.live
    for done in range(11):
        bar.update(done, 10, "note")
    bar.close("finished")
    assert stream.getvalue() == ""


def test_a_bar_on_a_terminal_follows_the_counts(
    terminal: tuple[TextIO, Callable[[], str]],
) -> None:
    stream, read = terminal
    bar = ProgressBar("work", stream=stream, min_interval_s=0)
    assert bar.live
    bar.update(3, 0)  # total not known yet: a count without a bar
    assert "work: 3 events" in read()
    bar.update(5, 10)
    assert "50%" in read()
    bar.close("ok")
    assert "100%" not in read()  # closed at 5 of 10: no pretending
    bar.close()  # twice is harmless


def test_bench_progress_redirected_is_only_its_final_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = _Progress("producing events", 1000)
    for done in (0, 10, 500, 999):
        progress.update(done)
    progress.finish("2.00s")
    assert capsys.readouterr().err == f"  {'producing events':<24} {1000:>10,}  2.00s\n"


def test_bench_progress_on_a_terminal_is_a_bar(
    monkeypatch: pytest.MonkeyPatch, terminal: tuple[TextIO, Callable[[], str]]
) -> None:
    stream, read = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    progress = _Progress("engine", 200)
    progress.update(100)
    progress.finish("1.50s")
    shown = read()
    assert "\r" in shown and "100%" in shown and "200/200" in shown and "1.50s" in shown
