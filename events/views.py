"""Views: state folded from events by pure reducers.

A reducer is an object with three pure functions (no I/O, no clock, no randomness, a result
that depends only on its arguments):

    empty() -> view                                  the view of an empty log
    apply(view, event) -> view                       fold one accepted event
    apply_equivocation(view, author, seq) -> view    the author signed two events at `seq`

A reducer may update its view in place and return it. Reducers must give the same view for
every order of one set of events (per-key last-writer-wins by (lamport, author), set and
counter merges), because events arrive in any order.

`Dispatcher` builds `apply` from one handler per event type and makes dispatch exhaustive.
A view projects whole families (`membership`, `shards`, ...), and every registered type of
those families must have a handler. A type of a projected family without a handler raises
ReducerError. The decisions for events that change nothing are fixed here: a type of
another family leaves the view unchanged, and so does an event of a type this node does not
know (a newer minor version, body `UnknownBody`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Generic, Protocol, TypeVar

from events.codec import Event
from events.errors import ReducerError
from events.model import UnknownBody, registered_type_of_class, registered_types, skipped_after_equivocation

V = TypeVar("V")
Handler = Callable[[V, Event], V]


class Reducer(Protocol[V]):
    """The pure functions that define one view."""

    def empty(self) -> V: ...

    def apply(self, view: V, event: Event) -> V: ...

    def apply_equivocation(self, view: V, author: str, seq: int) -> V: ...


class Dispatcher(Generic[V]):
    """Exhaustive dispatch from an event's body type to one handler of a view."""

    def __init__(self, view_name: str, families: Iterable[str], handlers: Mapping[type, Handler[V]]) -> None:
        self.view_name = view_name
        self.families = frozenset(families)
        self._handlers: dict[type, Handler[V]] = dict(handlers)
        for body_class in self._handlers:
            family = _family_of_class(body_class)
            if family not in self.families:
                raise ReducerError(
                    f"{view_name} has a handler for {body_class.__name__} of family {family!r}, "
                    f"but projects only {sorted(self.families)}"
                )
        self.check_exhaustive()

    def check_exhaustive(self) -> None:
        """Raise ReducerError if a registered type of a projected family has no handler."""
        for family in sorted(self.families):
            for registered in registered_types(family):
                if registered.cls not in self._handlers:
                    raise ReducerError(
                        f"{self.view_name} projects family {family!r} but has no handler for "
                        f"{registered.name}; add one to its dispatch table"
                    )

    def __call__(self, view: V, event: Event) -> V:
        handler = self._handlers.get(type(event.body))
        if handler is not None:
            return handler(view, event)
        if isinstance(event.body, UnknownBody):
            return view
        family = _family_of_class(type(event.body))
        if family in self.families:
            raise ReducerError(
                f"{self.view_name} has no handler for {event.type} of family {family!r}; "
                "a type was registered after the view was built, add it to the dispatch table"
            )
        return view


def _family_of_class(body_class: type) -> str:
    registered = registered_type_of_class(body_class)
    if registered is None:
        raise ReducerError(f"{body_class.__name__} is not a registered event type")
    return registered.family


class Projection(Generic[V]):
    """A reducer and its current view, kept up to date by the Acceptor."""

    def __init__(self, reducer: Reducer[V]) -> None:
        self.reducer = reducer
        self.view: V = reducer.empty()

    def apply(self, event: Event) -> None:
        self.view = self.reducer.apply(self.view, event)

    def rebuild(self, events: Iterable[Event], equivocations: Mapping[str, int]) -> None:
        """Refold the view from scratch: equivocations first, then events in canonical order.

        `equivocations` maps each equivocating author to its lowest disputed seq
        (`LogStore.disputed_seqs()`). That author's events from that seq on, and all its
        request-scoped records, are skipped (`skipped_after_equivocation`).
        """
        view = self.reducer.empty()
        for author, seq in sorted(equivocations.items()):
            view = self.reducer.apply_equivocation(view, author, seq)
        for event in events:
            if skipped_after_equivocation(event.type, event.seq, equivocations.get(event.author)):
                continue
            view = self.reducer.apply(view, event)
        self.view = view
