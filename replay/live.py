"""Views kept current while the node keeps writing its log (`cortex status --watch`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from replay.fold import Folder
from replay.reader import LogReader, is_swarm_scoped
from replay.views import LoadedView

logger = logging.getLogger(__name__)


class LiveViews:
    """Folds a log once, then folds only the events that arrive later, in arrival order.

    An arriving event that completes an equivocation makes the views fold again from the
    start, as the node's Acceptor does.
    """

    def __init__(self, reader: LogReader, views: Sequence[LoadedView]) -> None:
        self.reader = reader
        self._views = list(views)
        self.rebuilds = 0
        self._rebuild()

    def _rebuild(self) -> None:
        with self.reader.snapshot():
            self.folder = Folder(self.reader, self._views)
            self.folder.run()
            self.last_rowid = self.reader.max_rowid()
        self._version = self.reader.data_version()
        self.rebuilds += 1

    @property
    def views(self) -> dict[str, Any]:
        return self.folder.views

    def refresh(self) -> int:
        """Fold the events stored since the last refresh; return how many arrived."""
        version = self.reader.data_version()
        if version == self._version:
            return 0
        self._version = version
        rows, self.last_rowid = self.reader.arrivals_batch(None, self.last_rowid)
        if any(is_swarm_scoped(event.type) and self.reader.events_at(event.author, event.seq) > 1 for _rowid, event in rows):
            logger.info("an arriving event completes an equivocation; folding the log again")
            self._rebuild()
            return len(rows)
        for _rowid, event in rows:
            self.folder.apply_late(event)
        return len(rows)
