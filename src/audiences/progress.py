"""Progress bars of the CLI (`apply --wait`, `bench`), drawn by tqdm on a terminal only:
redirected to a file or a pipe, nothing progress-like is written (no `\\r`, no bars)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class ProgressBar:
    """One bar on `stream` (stderr by default), updated with absolute counts; every call
    is a no-op when the stream is not a terminal (`live` is False)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "events",
        stream: TextIO | None = None,
        min_interval_s: float = 0.1,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.live = is_terminal(self.stream)
        self._bar: tqdm[None] | None = None
        if self.live:
            self._bar = tqdm(
                total=total or None,
                desc=label,
                unit=f" {unit}",
                file=self.stream,
                mininterval=min_interval_s,
                miniters=1,  # absolute counts jump: redraw by time, not by iterations
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, done: int, total: int | None = None, note: str | None = None) -> None:
        """Show `done` (of `total`, when it changed; 0 = not known yet), and `note` after
        the bar. tqdm redraws at most every `min_interval_s`."""
        bar = self._bar
        if bar is None:
            return
        if total is not None and (total or None) != bar.total:
            bar.total = total or None
            bar.refresh()
        if note is not None:
            bar.set_postfix_str(note, refresh=False)
        if done != bar.n:
            bar.update(done - bar.n)

    def close(self, note: str | None = None) -> None:
        """Draw the last state (with `note`) and end the line."""
        bar, self._bar = self._bar, None
        if bar is None:
            return
        if note is not None:
            bar.set_postfix_str(note, refresh=False)
        bar.close()
