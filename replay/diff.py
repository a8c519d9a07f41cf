"""Compare two nodes' logs: the events one has and the other lacks, and where their views part.

Both logs are folded in their own canonical order, side by side. While the two logs hold
the same events at the same positions their views are equal (reducers are deterministic),
so digests are computed only from the first position where the events differ, after every
step, until each view's digests differ or both logs end. `first_index` of a view is that
position (from 0): the view of log A after its event at that index differs from the view
of log B after its event at that index. Equal final digests mean the nodes converged even if
their logs differ (events that no view projects, for example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from replay.fold import Folder, FoldStep
from replay.reader import LogReader
from replay.views import LoadedView, view_digest

MAX_LISTED = 1000
"""Missing events listed per side; the rest are only counted."""


@dataclass(frozen=True)
class MissingEvent:
    """An event that one log has and the other lacks, at its index in the log that has it."""

    index: int
    id: str
    type: str
    author: str
    seq: int


@dataclass
class ViewDivergence:
    """The first index at which one view differs between two logs, and its final digests."""

    first_index: int | None
    event_a: str | None
    event_b: str | None
    final_digest_a: str = ""
    final_digest_b: str = ""


@dataclass
class DiffReport:
    """Everything `diff_logs` found."""

    events_a: int = 0
    events_b: int = 0
    only_in_a: list[MissingEvent] = field(default_factory=list)
    only_in_b: list[MissingEvent] = field(default_factory=list)
    only_in_a_count: int = 0
    only_in_b_count: int = 0
    first_event_difference: int | None = None
    views: dict[str, ViewDivergence] = field(default_factory=dict)

    @property
    def same_events(self) -> bool:
        return self.only_in_a_count == 0 and self.only_in_b_count == 0

    @property
    def same_views(self) -> bool:
        return all(view.first_index is None for view in self.views.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "events_a": self.events_a,
            "events_b": self.events_b,
            "only_in_a_count": self.only_in_a_count,
            "only_in_b_count": self.only_in_b_count,
            "only_in_a": [asdict(item) for item in self.only_in_a],
            "only_in_b": [asdict(item) for item in self.only_in_b],
            "first_event_difference": self.first_event_difference,
            "views": {name: asdict(view) for name, view in self.views.items()},
            "same_events": self.same_events,
            "same_views": self.same_views,
        }


def diff_logs(reader_a: LogReader, reader_b: LogReader, views: Sequence[LoadedView]) -> DiffReport:
    """Compare two logs: missing events on each side and the first differing view state."""
    report = DiffReport()
    ids_a = reader_a.stored_ids()
    ids_b = reader_b.stored_ids()
    report.events_a, report.events_b = len(ids_a), len(ids_b)
    report.only_in_a_count = _list_missing(reader_a, ids_b, report.only_in_a)
    report.only_in_b_count = _list_missing(reader_b, ids_a, report.only_in_b)
    _compare_views(reader_a, reader_b, views, report)
    return report


def _list_missing(reader: LogReader, other_ids: set[str], out: list[MissingEvent]) -> int:
    count = 0
    for index, (event_id, type_name, author, seq) in enumerate(reader.canonical_keys()):
        if event_id in other_ids:
            continue
        count += 1
        if len(out) < MAX_LISTED:
            out.append(MissingEvent(index, event_id, type_name, author, seq))
    return count


def _compare_views(reader_a: LogReader, reader_b: LogReader, views: Sequence[LoadedView], report: DiffReport) -> None:
    folder_a, folder_b = Folder(reader_a, views), Folder(reader_b, views)
    pending = set(folder_a.names)
    first: dict[str, tuple[int, str | None, str | None]] = {}
    index = -1
    while True:
        step_a, step_b = folder_a.step(), folder_b.step()
        if step_a is None and step_b is None:
            break
        index += 1
        if report.first_event_difference is None and _event_id(step_a) != _event_id(step_b):
            report.first_event_difference = index
        if report.first_event_difference is None:
            continue
        if not pending:
            break
        states_a, states_b = folder_a.views, folder_b.views
        for name in sorted(pending):
            if view_digest(states_a[name]) != view_digest(states_b[name]):
                first[name] = (index, _event_id(step_a), _event_id(step_b))
                pending.discard(name)
    folder_a.run()
    folder_b.run()
    for name in folder_a.names:
        index_and_events = first.get(name)
        divergence = ViewDivergence(*(index_and_events or (None, None, None)))
        divergence.final_digest_a = view_digest(folder_a.view(name))
        divergence.final_digest_b = view_digest(folder_b.view(name))
        report.views[name] = divergence


def _event_id(step: FoldStep | None) -> str | None:
    return None if step is None else step.event.id
