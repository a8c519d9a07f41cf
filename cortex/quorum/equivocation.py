"""Penalties for equivocation: one `PeerPenalized(equivocated)` per author and seq found by this node.

The event core keeps both events of an equivocation (two events with one author and seq) as
evidence in the log's equivocation table. The trust fold already sets such an author's trust
to 0 from that table; the penalty event makes the finding visible to every node, with both
event ids as evidence. The fold passes over `equivocated` penalties, so they never count twice.

`EquivocationReporter.new_penalties` is cheap when nothing changed: it reads the table only
after the acceptor's equivocation counter moved. A node that restarts finds its own earlier
penalties in its log and does not publish them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cortex.quorum.events import EQUIVOCATED, PeerPenalized
from events import LogStore

logger = logging.getLogger(__name__)


class EquivocationReporter:
    """Turns new rows of the log's equivocation table into penalties, once per (author, seq)."""

    def __init__(self, store: LogStore, own_peer: str, found: Callable[[], int]) -> None:
        self.store = store
        self.own_peer = own_peer
        self.found = found  # the acceptor's count of equivocations found since start
        self._checked = -1  # the count at the last check; -1 reads the table on the first call
        self._reported = self._already_reported()

    def new_penalties(self) -> list[PeerPenalized]:
        """Return a penalty for each equivocation (author, seq) not penalized by this node yet."""
        count = self.found()
        if count == self._checked:
            return []
        self._checked = count
        penalties = []
        for equivocation in self.store.equivocations():
            key = (equivocation.author, equivocation.seq)
            if key in self._reported or equivocation.author == self.own_peer:
                continue
            self._reported.add(key)
            evidence = (equivocation.first_id, equivocation.second_id)
            logger.warning("peer %s signed two events with seq %d (%s and %s); penalized", *key, *evidence)
            detail = f"two events with seq {equivocation.seq}"
            penalties.append(PeerPenalized(equivocation.author, EQUIVOCATED, evidence, detail))
        return penalties

    def _already_reported(self) -> set[tuple[str, int]]:
        seq_of = {
            frozenset((equivocation.first_id, equivocation.second_id)): (equivocation.author, equivocation.seq)
            for equivocation in self.store.equivocations()
        }
        reported = set()
        for event in self.store.events(type=PeerPenalized.__name__, author=self.own_peer):
            if event.body.reason == EQUIVOCATED and frozenset(event.body.evidence) in seq_of:
                reported.add(seq_of[frozenset(event.body.evidence)])
        return reported
