"""Fold a log through the node's reducers, event by event, in canonical order.

`Folder` gives the views that a node holding exactly the events folded so far would have,
the same result as `Projection.rebuild` over those events (which is what the node's
Acceptor does at start and after it detects an equivocation):

- events are applied in canonical order `(lamport, author, seq, id)`;
- an equivocation counts once both of its events have been folded. From then on the
  author's events from the disputed seq on, and all its request-scoped records, are
  ignored (`events.model.skipped_after_equivocation`), every view receives
  `apply_equivocation`, and the views are refolded from the start of the log (the log is
  read again, so no event is kept in memory). Equivocations are rare, so the refolds are.

Positions (`index`) count every event of the log in canonical order from 0, including
events that a selection (`include`) leaves out, so an index means the same for every
selection and in `diff`.

Signatures are not checked here: `replay.verify` does that.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from events.codec import Event
from events.model import skipped_after_equivocation, type_by_name
from events.views import Dispatcher
from replay.reader import LogReader, is_swarm_scoped
from replay.views import LoadedView

logger = logging.getLogger(__name__)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block (reference counting still frees).

    A fold builds views that grow to millions of objects, and each collector pass walks
    them all. On the replay bench log (1M events) pausing it made folding about 15-25%
    faster; the views built are the same.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def projected_families(reducer: Any) -> frozenset[str] | None:
    """Return the event families a reducer projects, or None when it does not say (it gets every event).

    A reducer says so with a `families` attribute, or through the `events.views.Dispatcher` it
    dispatches with (`_dispatch`). A Dispatcher leaves the view unchanged for any event of another
    family and for an event of an unknown type, so skipping those events gives the same view.
    """
    families = getattr(reducer, "families", None)
    if families is None:
        # NOTE: reads the Dispatcher that the Registry, Scheduler and Trust reducers keep in
        # `_dispatch`, and trusts that their `apply` changes nothing outside its families (true
        # of all three today). A public `families` on them would make this fallback unneeded.
        dispatcher = getattr(reducer, "_dispatch", None)
        families = dispatcher.families if isinstance(dispatcher, Dispatcher) else None
    return None if families is None else frozenset(families)


@dataclass(frozen=True)
class FoldStep:
    """One event the folder reached: its position, and whether it changed the views."""

    index: int
    event: Event
    applied: bool
    """False when the selection leaves the event out or its author equivocated before it."""
    refolded: bool
    """True when this event completed an equivocation and the views were refolded."""


class Folder:
    """Folds one log's events through fresh reducers of the given views; see the module docstring."""

    def __init__(
        self, reader: LogReader, views: Sequence[LoadedView], include: Callable[[Event], bool] | None = None
    ) -> None:
        self.reader = reader
        self.names = [view.name for view in views]
        self._reducers = [view.new_reducer() for view in views]
        self._families = [projected_families(reducer) for reducer in self._reducers]
        self._targets: dict[str, list[int]] = {}
        self._include = include
        self._disputed = reader.disputed_keys()
        self._seen_at_disputed: dict[tuple[str, int], set[str]] = {}
        self.excluded: dict[str, int] = {}
        self.index = -1
        self.last_event: Event | None = None
        self.applied_count = 0
        self._states: list[Any] = self._empty_states()
        self._source: Iterator[Event] = reader.canonical()

    @property
    def views(self) -> dict[str, Any]:
        """The current view of each reducer, by view name."""
        return dict(zip(self.names, self._states))

    def view(self, name: str) -> Any:
        return self._states[self.names.index(name)]

    @property
    def now_ms(self) -> int | None:
        """The time of the last event folded, which replay passes as "now" to liveness queries."""
        return None if self.last_event is None else self.last_event.time_ms

    def step(self) -> FoldStep | None:
        """Fold the next event in canonical order; return None at the end of the log."""
        event = next(self._source, None)
        if event is None:
            return None
        self.index += 1
        refolded = False
        if self._disputed and (event.author, event.seq) in self._disputed and is_swarm_scoped(event.type):
            refolded = self._note_disputed(event)
        applied = self._selected(event)
        if applied and not refolded:
            self._apply(event)
        if applied:
            self.last_event = event
        return FoldStep(self.index, event, applied, refolded)

    def run(self, stop_index: int | None = None) -> int:
        """Fold until the event at `stop_index` (included) or the end.

        Returns how many more events the views hold than before the call. A refold after an
        equivocation counts the events again, so this is not the number of steps taken.
        """
        applied_before = self.applied_count
        with paused_gc():
            if not self._disputed and self._include is None and stop_index is None:
                self._run_fast()
            else:
                while stop_index is None or self.index < stop_index:
                    if self.step() is None:
                        break
        return self.applied_count - applied_before

    def apply_late(self, event: Event) -> bool:
        """Fold an event that arrived after the fold (`cortex status --watch`); return whether it applied.

        Reducers give the same view for every delivery order, so a late event is applied
        where it arrives, as the node does. The caller rebuilds the Folder instead when the
        event completes an equivocation (`LogReader.events_at` > 1).
        """
        if not self._selected(event):
            return False
        self._apply(event)
        return True

    def _run_fast(self) -> None:
        # The common case (no equivocation, no selection): the plain fold loop of Projection.rebuild,
        # passing each event only to the reducers that project its family.
        appliers = [reducer.apply for reducer in self._reducers]
        states = self._states
        targets = self._targets
        event: Event | None = None
        count = 0
        for event in self._source:
            count += 1
            positions = targets.get(event.type)
            if positions is None:
                positions = self._targets_of(event.type)
            for position in positions:
                states[position] = appliers[position](states[position], event)
        self.index += count
        self.applied_count += count
        if event is not None:
            self.last_event = event

    def _selected(self, event: Event) -> bool:
        if self._include is not None and not self._include(event):
            return False
        return not skipped_after_equivocation(event.type, event.seq, self.excluded.get(event.author))

    def _apply(self, event: Event) -> None:
        states = self._states
        positions = self._targets.get(event.type)
        if positions is None:
            positions = self._targets_of(event.type)
        for position in positions:
            states[position] = self._reducers[position].apply(states[position], event)
        self.applied_count += 1

    def _note_disputed(self, event: Event) -> bool:
        """Record an event at a disputed (author, seq); refold when it completes an equivocation."""
        key = (event.author, event.seq)
        seen = self._seen_at_disputed.setdefault(key, set())
        seen.add(event.id)
        if len(seen) < 2:
            return False
        current = self.excluded.get(event.author)
        if current is not None and current <= event.seq:
            return False
        self.excluded[event.author] = event.seq
        logger.debug("equivocation by %s at seq %d: refolding up to index %d", event.author, event.seq, self.index)
        self._refold()
        return True

    def _targets_of(self, type_name: str) -> list[int]:
        """Return the positions of the reducers that events of this type may change, and cache them."""
        registered = type_by_name(type_name)
        family = None if registered is None else registered.family
        positions = [
            position
            for position, families in enumerate(self._families)
            if families is None or (family is not None and family in families)
        ]
        self._targets[type_name] = positions
        return positions

    def _empty_states(self) -> list[Any]:
        states = [reducer.empty() for reducer in self._reducers]
        for author, seq in sorted(self.excluded.items()):
            states = [reducer.apply_equivocation(state, author, seq) for reducer, state in zip(self._reducers, states)]
        return states

    def _refold(self) -> None:
        """Fold events 0..index again from the log, with the exclusions known now."""
        self._states = self._empty_states()
        self.applied_count = 0
        self.last_event = None
        for position, event in enumerate(self.reader.canonical()):
            if position > self.index:
                break
            if self._selected(event):
                self._apply(event)
                self.last_event = event
