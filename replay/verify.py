"""`--verify`: check a log the way a receiving node checks events, and more.

Problems (any of them makes `cortex replay --verify` exit with status 1):

    undecodable        the stored bytes no longer pass the codec's checks
    bad_signature      the Ed25519 signature does not verify over the stored payload
    id_mismatch        the stored id is not BLAKE2b-256 of the payload
    column_mismatch    an indexed column (author, seq, lamport, time_ms, type) differs from the payload
    refs_mismatch      the refs table differs from the payload's refs
    sequence_gap       an author's seqs skip numbers that the author did not void: events
                       were missed
    equivocation       two different events with one author and seq
    unrecorded_equivocation  an equivocation that the equivocations table does not list
    lamport_order      an event's Lamport clock is not above that of an event it refs, or an
                       author's Lamport clocks do not rise with its swarm-scoped seqs
                       (request-scoped records number their own sequence)
    integrity          SQLite's integrity check failed

Warnings (reported, exit status unchanged):

    voided_seqs        seqs the author declared void with `SequenceSkipped` (it will never
                       sign them, after losing its last events to a power failure)
    skipped_at_join    seqs missing at or below the sync floor of the node's live-join
                       snapshot (`bus-state.json` next to the log), which left out bulky
                       history such as old heartbeats; gaps above the floor stay problems
    dangling_ref       a ref to an event this log does not hold. A ref equal to the request
                       id of a `RequestSubmitted` in the log counts as resolved, because every
                       request-scoped record refs its request id, which is not an event id.
                       Request-scoped records reach only the nodes on a request's route, so a
                       dangling ref can still be normal
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from events.codec import Event, event_id, parse_event, verify_event
from events.errors import EventRejected
from events.identity import SIGNATURE_BYTES
from replay.reader import SUBMITTED_REQUEST_FUNCTION, LogReader, StoredRow

MAX_LISTED = 1000
BUS_STATE_FILE_NAME = "bus-state.json"
"""The bus state file a node keeps in its data directory, next to its log (`Node` sets it)."""
"""Problems of one kind listed in full; the rest are only counted."""


@dataclass(frozen=True)
class Finding:
    """One problem or warning, with the author, seq and event it concerns where known."""

    kind: str
    message: str
    author: str | None = None
    seq: int | None = None
    event_id: str | None = None


@dataclass
class VerifyReport:
    """Counts, problems and warnings found by `verify_log`."""

    events: int = 0
    authors: int = 0
    signatures_checked: int = 0
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, finding: Finding, warning: bool = False) -> None:
        self.counts[finding.kind] += 1
        if self.counts[finding.kind] <= MAX_LISTED:
            (self.warnings if warning else self.problems).append(finding)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "authors": self.authors,
            "signatures_checked": self.signatures_checked,
            "counts": dict(sorted(self.counts.items())),
            "problems": [asdict(finding) for finding in self.problems],
            "warnings": [asdict(finding) for finding in self.warnings],
        }


def verify_log(reader: LogReader) -> VerifyReport:
    """Check every stored event, every author's sequence, and the file; see the module docstring."""
    report = VerifyReport()
    refs = reader.refs_by_rowid()
    pending_refs = next(refs, None)
    for row in reader.rows():
        report.events += 1
        stored_refs: set[str] = set()
        while pending_refs is not None and pending_refs[0] <= row.rowid:
            if pending_refs[0] == row.rowid:
                stored_refs = pending_refs[1]
            pending_refs = next(refs, None)
        event = _check_row(row, report)
        if event is not None and set(event.refs) != stored_refs:
            report.add(Finding("refs_mismatch", f"refs table lists {sorted(stored_refs)}, payload has {list(event.refs)}",
                               event.author, event.seq, event.id))
    _check_sequences(reader, report)
    _check_lamport(reader, report)
    _check_dangling_refs(reader, report)
    integrity = reader.integrity_check()
    if integrity != "ok":
        report.add(Finding("integrity", f"SQLite integrity check: {integrity}"))
    return report


def _check_row(row: StoredRow, report: VerifyReport) -> Event | None:
    try:
        event = parse_event(row.wire)
    except EventRejected as error:
        report.add(Finding("undecodable", f"row {row.rowid}: {error}", row.author, row.seq, row.id))
        return None
    report.signatures_checked += 1
    try:
        verify_event(event)
    except EventRejected as error:
        report.add(Finding("bad_signature", str(error), event.author, event.seq, event.id))
    computed = event_id(event.payload)
    if computed != row.id:
        report.add(Finding("id_mismatch", f"stored id {row.id} but the payload hashes to {computed}", event.author, event.seq, row.id))
    stored = (row.author, row.seq, row.lamport, row.time_ms, row.type)
    signed = (event.author, event.seq, event.lamport, event.time_ms, event.type)
    if stored != signed:
        names = ("author", "seq", "lamport", "time_ms", "type")
        differences = ", ".join(f"{name} {a!r} != {b!r}" for name, a, b in zip(names, stored, signed) if a != b)
        report.add(Finding("column_mismatch", f"stored columns differ from the payload: {differences}", event.author, event.seq, event.id))
    return event


def _check_sequences(reader: LogReader, report: VerifyReport) -> None:
    seqs_by_author = reader.author_seqs()
    report.authors = len(seqs_by_author)
    voided = _voided_ranges(reader)
    for author, first, last in sorted((author, *span) for author, spans in voided.items() for span in spans):
        report.add(Finding("voided_seqs", f"{_seqs_text(first, last)} declared void by the author", author, first), warning=True)
    floors = _sync_floors(reader)
    for author, seqs in seqs_by_author.items():
        floor = floors.get(author, 0)
        for first, last in _gaps(seqs):
            for gap_first, gap_last in _subtract(first, last, voided.get(author, [])):
                if gap_first <= floor:
                    below_last = min(gap_last, floor)
                    report.add(Finding("skipped_at_join",
                                       f"{_seqs_text(gap_first, below_last)} missing, at or below the sync floor {floor} "
                                       "that this node's live-join snapshot set", author, gap_first), warning=True)
                    gap_first = below_last + 1
                if gap_first <= gap_last:
                    missing = _seqs_text(gap_first, gap_last)
                    report.add(Finding("sequence_gap", f"{missing} missing ({gap_last - gap_first + 1} events)", author, gap_first))
    recorded = {(item.author, item.seq, item.first_id, item.second_id) for item in reader.recorded_equivocations()}
    rows = reader.query(
        f"SELECT author, seq, id FROM events WHERE {reader.swarm_condition} AND (author, seq) IN "
        f"(SELECT author, seq FROM events WHERE {reader.swarm_condition} GROUP BY author, seq HAVING COUNT(*) > 1) "
        "ORDER BY author, seq, id"
    )
    disputed: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for author, seq, stored_id in rows:
        disputed[(author, seq)].append(bytes(stored_id).hex())
    for (author, seq), ids in disputed.items():
        report.add(Finding("equivocation", f"{len(ids)} different events at seq {seq}: {', '.join(ids)}", author, seq))
        for position, first_id in enumerate(ids):
            for second_id in ids[position + 1 :]:
                if (author, seq, first_id, second_id) not in recorded:
                    report.add(Finding("unrecorded_equivocation",
                                       f"events {first_id} and {second_id} share seq {seq} but the equivocations table lacks them",
                                       author, seq))


def _sync_floors(reader: LogReader) -> dict[str, int]:
    """Return the sync floors in the node's bus state file next to the log, or {} without one.

    A node that joins live fetches a snapshot that leaves out bulky history, such as all but
    each author's latest heartbeat, and never fetches seqs at or below the snapshot's heads,
    its sync floors (`cortex.bus.bus`, docs/bus.md). Gaps there are expected.
    """
    path = reader.path.parent / BUS_STATE_FILE_NAME
    try:
        state = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    floors = state.get("floors") if isinstance(state, dict) else None
    if not isinstance(floors, dict):
        return {}
    return {str(author): seq for author, seq in floors.items() if isinstance(seq, int)}


def _seqs_text(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first} to {last}"


def _voided_ranges(reader: LogReader) -> dict[str, list[tuple[int, int]]]:
    """Return the seq ranges each author voided with SequenceSkipped events (read from the payload)."""
    voided: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for author, wire in reader.query("SELECT author, wire FROM events WHERE type = 'SequenceSkipped'"):
        try:
            body = orjson.loads(bytes(wire)[:-SIGNATURE_BYTES])["body"]
            voided[author].append((int(body["first"]), int(body["last"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # An undecodable row is reported by the row checks.
    return voided


def _subtract(first: int, last: int, spans: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Yield the parts of the range first..last (inclusive) that no span covers."""
    position = first
    for span_first, span_last in sorted(spans):
        if span_last < position or span_first > last:
            continue
        if span_first > position:
            yield position, span_first - 1
        position = max(position, span_last + 1)
    if position <= last:
        yield position, last


def _gaps(seqs: list[int]) -> Iterator[tuple[int, int]]:
    expected = 1
    for seq in seqs:
        if seq > expected:
            yield expected, seq - 1
        expected = seq + 1


def _check_lamport(reader: LogReader, report: VerifyReport) -> None:
    after_ref = reader.query(
        "SELECT e.author, e.seq, e.id, e.lamport, t.id, t.lamport FROM refs AS r "
        "JOIN events AS e ON e.rowid = r.event_rowid JOIN events AS t ON t.id = r.ref "
        "WHERE e.lamport <= t.lamport ORDER BY e.rowid"
    )
    for author, seq, stored_id, lamport, ref_id, ref_lamport in after_ref:
        report.add(Finding("lamport_order",
                           f"Lamport clock {lamport} is not above {ref_lamport} of the referenced event {bytes(ref_id).hex()}",
                           author, seq, bytes(stored_id).hex()))
    not_rising = reader.query(
        "SELECT author, seq, id, lamport, previous FROM (SELECT author, seq, id, lamport, "
        "LAG(lamport) OVER (PARTITION BY author ORDER BY seq, lamport) AS previous, "
        "LAG(seq) OVER (PARTITION BY author ORDER BY seq, lamport) AS previous_seq FROM events "
        # Seqs with two events are reported as equivocations and left out of this check. Request-scoped
        # records number their own sequence, so their seqs do not order the swarm-scoped clocks.
        f"WHERE {reader.swarm_condition} AND (author, seq) NOT IN "
        f"(SELECT author, seq FROM events WHERE {reader.swarm_condition} GROUP BY author, seq HAVING COUNT(*) > 1)) "
        "WHERE previous >= lamport AND previous_seq < seq ORDER BY author, seq"
    )
    for author, seq, stored_id, lamport, previous in not_rising:
        report.add(Finding("lamport_order",
                           f"Lamport clock {lamport} is not above {previous}, the clock of the author's previous event",
                           author, seq, bytes(stored_id).hex()))


def _check_dangling_refs(reader: LogReader, report: VerifyReport) -> None:
    dangling = reader.query(
        "SELECT e.author, e.seq, e.id, r.ref FROM refs AS r JOIN events AS e ON e.rowid = r.event_rowid "
        "LEFT JOIN events AS t ON t.id = r.ref WHERE t.id IS NULL ORDER BY e.rowid"
    )
    submitted = {
        request_id for (request_id,) in reader.query(
            f"SELECT {SUBMITTED_REQUEST_FUNCTION}(author, wire) FROM events WHERE type = 'RequestSubmitted'"
        )
    }
    for author, seq, stored_id, ref in dangling:
        if bytes(ref).hex() in submitted:
            continue
        report.add(Finding("dangling_ref", f"refs {bytes(ref).hex()}, which this log does not hold", author, seq,
                           bytes(stored_id).hex()), warning=True)
