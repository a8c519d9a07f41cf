"""What a swarm run did, read back from the node logs: which peer served which expert rows.

The driver's log holds the `ExpertBatchServed` records its block holders accepted (signed
by the expert holders), so counting them per author shows where each MoE layer's outputs
came from. Read the logs after the nodes stopped, or while they run (SQLite WAL allows a
second reader).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import cortex.driver.records  # noqa: F401 - registers ExpertBatchServed
import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.driver.records import ExpertBatchServed
from events import LogStore


def expert_records(data_dir: Path, sessions: set[str] | None = None) -> list[tuple[str, ExpertBatchServed, int]]:
    """Return (author, record, time_ms) of the ExpertBatchServed records in a node's log."""
    store = LogStore(data_dir / "events.db")
    try:
        found = []
        for event in store.events(type="ExpertBatchServed"):
            body = event.body
            if isinstance(body, ExpertBatchServed) and (sessions is None or sessions & set(body.sessions)):
                found.append((event.author, body, event.time_ms))
        return found
    finally:
        store.close()


def served_rows(records: list[tuple[str, ExpertBatchServed, int]]) -> dict[str, dict[str, Any]]:
    """Sum expert rows and distinct experts per author."""
    rows: collections.Counter[str] = collections.Counter()
    experts: dict[str, set[str]] = collections.defaultdict(set)
    batches: collections.Counter[str] = collections.Counter()
    for author, body, _ in records:
        batches[author] += 1
        for segment in body.segments:
            layer, expert, count = segment.split(":")
            rows[author] += int(count)
            experts[author].add(f"expert[{layer}][{expert}]")
    return {
        author: {"batches": batches[author], "rows": rows[author], "experts": sorted(experts[author])}
        for author in sorted(batches)
    }
