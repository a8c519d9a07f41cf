"""What a swarm run did, read back from a node's log: which peer produced which expert outputs.

A block holder's log contains the `ExpertBatchProduced` (or, from older nodes,
`ExpertOutputProduced`) records that came back with the expert outputs of its MoE layers. Each is signed by the expert holder that computed it, so
counting them per author shows where every MoE layer's outputs came from. Read the log
after the nodes stopped, or while they run (SQLite WAL allows a second reader).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.comm import ExpertBatchProduced, ExpertOutputProduced
from events import LogStore


@dataclass(frozen=True)
class ExpertRecord:
    """One expert output as the log records it."""

    author: str
    request_id: str
    step: int
    layer: int
    expert: int
    rows: int
    time_ms: int


def expert_records(data_dir: Path, request_ids: set[str] | None = None) -> list[ExpertRecord]:
    """Return one entry per expert output recorded in a node's log, for `request_ids` if given.

    An `ExpertBatchProduced` record gives one entry per expert it lists, an
    `ExpertOutputProduced` record one entry.
    """
    store = LogStore(data_dir / "events.db")
    try:
        found = []
        for type_name in (ExpertOutputProduced.__name__, ExpertBatchProduced.__name__):
            for event in store.events(type=type_name):
                body = event.body
                request_id = event.refs[0] if event.refs else ""
                if not isinstance(body, (ExpertOutputProduced, ExpertBatchProduced)):
                    continue
                if request_ids is not None and request_id not in request_ids:
                    continue
                if isinstance(body, ExpertOutputProduced):
                    outputs = [(body.expert, body.shape)]
                else:
                    outputs = list(zip(body.experts, body.shapes))
                for expert, shape in outputs:
                    rows = shape[0] if shape else 0
                    found.append(ExpertRecord(event.author, request_id, body.step, body.layer, expert, rows, event.time_ms))
        return sorted(found, key=lambda record: (record.time_ms, record.author, record.layer, record.expert))
    finally:
        store.close()


def served_rows(records: list[ExpertRecord]) -> dict[str, dict[str, Any]]:
    """Sum expert outputs, rows and distinct experts per author.

    `calls` counts expert outputs, one per expert of a call: a multi-expert call counts once
    per expert it carried.
    """
    rows: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    experts: dict[str, set[str]] = collections.defaultdict(set)
    for record in records:
        calls[record.author] += 1
        rows[record.author] += record.rows
        experts[record.author].add(f"expert[{record.layer}][{record.expert}]")
    return {author: {"calls": calls[author], "rows": rows[author], "experts": sorted(experts[author])} for author in sorted(calls)}
