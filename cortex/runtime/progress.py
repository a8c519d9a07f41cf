"""Progress of a load that takes more than a moment.

Nothing is shown for the first `SHOW_AFTER_S` seconds, so small loads stay
quiet. After that a rich progress bar appears on stderr when stderr is a
terminal; otherwise an info log line is written every `LOG_EVERY_S` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)

SHOW_AFTER_S = 1.0
LOG_EVERY_S = 5.0
MIB = 1024 * 1024


class LoadProgress:
    """Counts the bytes of a load and reports them once it runs past `SHOW_AFTER_S`."""

    def __init__(self, description: str, total_bytes: int, terminal: bool | None = None) -> None:
        self.description = description
        self.total_bytes = max(total_bytes, 1)
        self.done_bytes = 0
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> LoadProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def advance(self, nbytes: int) -> None:
        """Record `nbytes` more loaded and update the bar or log."""
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self._started < SHOW_AFTER_S:
            return
        if self.terminal:
            self._update_bar()
        elif now - self._last_log >= LOG_EVERY_S or self._last_log == self._started:
            self._last_log = now
            logger.info(
                "loading %s: %.1f of %.1f MiB (%.0f%%)",
                self.description,
                self.done_bytes / MIB,
                self.total_bytes / MIB,
                100.0 * self.done_bytes / self.total_bytes,
            )

    def _update_bar(self) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(f"loading {self.description}", total=self.total_bytes)
        assert self._task is not None
        self._bar.update(self._task, completed=self.done_bytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
