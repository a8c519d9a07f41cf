"""Read-only access to a node's event log while the node may be writing it.

The log is the SQLite file that `events.store.LogStore` writes (its docstring states the
format). `LogReader` opens it with `mode=ro`, so a reader never takes the write lock, never
creates tables and never changes the file. In WAL mode readers and the writer do not block
each other: each query reads the transactions committed before it started. A reader still
needs the `-shm` file beside the log, which the writing node keeps. For a log that no
process has open, SQLite (3.22 and later) opens the file read-only without it.

Two orders are offered:

- canonical order `(lamport, author, seq, id)`: the replay order, the same as
  `LogStore.events()` with the id as a final tie-break, so that two events of an
  equivocation (one author and seq) have a fixed order too;
- arrival order (`rowid`): the order in which this node stored the events, which is what
  `cortex tail` shows and follows.

`data_version()` is SQLite's `PRAGMA data_version`: it changes when another connection
commits, so a follower checks it at a short interval and queries only when it changed.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from events.codec import Event, parse_event
from events.errors import EventRejected
from events.identity import SIGNATURE_BYTES
from events.model import SWARM_SCOPE, scope_of
from events.store import FORMAT_VERSION, Equivocation
from replay.arguments import LOG_FILE_NAME
from replay.errors import EventNotFound, LogOpenError

_CANONICAL = " ORDER BY e.lamport, e.author, e.seq, e.id"


def is_swarm_scoped(type_name: str) -> bool:
    """Return whether events of this type take seqs in the author's swarm sequence.

    Request-scoped records take seqs in a sequence of their own (`events.model.scope_of`).
    """
    return scope_of(type_name) == SWARM_SCOPE


_ID_PATTERN_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class EventFilter:
    """Conditions on events; empty fields select everything. Conditions combine with AND.

    `author` matches a peer id or its start or end (lines show the end as the short id).
    `request` selects the event with that id, every event whose refs contain it, every
    event whose body has `"request_id": request` (found by a substring search of the
    canonical payload, which scans the log), and the `RequestSubmitted` whose author and
    nonce give that request id.
    `since_ms <= time_ms < until_ms` uses the authors' clocks.
    """

    types: tuple[str, ...] = ()
    author: str | None = None
    request: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """Return a WHERE clause (or "") over table alias `e`, and its parameters."""
        conditions: list[str] = []
        parameters: list[Any] = []
        if self.types:
            conditions.append(f"e.type IN ({', '.join('?' * len(self.types))})")
            parameters.extend(self.types)
        if self.author:
            escaped = self.author.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conditions.append("(e.author LIKE ? ESCAPE '\\' OR e.author LIKE ? ESCAPE '\\')")
            parameters.extend([escaped + "%", "%" + escaped])
        if self.request:
            request = bytes.fromhex(self.request)
            conditions.append(
                "(e.id = ? OR e.rowid IN (SELECT event_rowid FROM refs WHERE ref = ?) OR instr(e.wire, ?) > 0"
                f" OR (e.type = 'RequestSubmitted' AND {SUBMITTED_REQUEST_FUNCTION}(e.author, e.wire) = ?))"
            )
            parameters.extend([request, request, request_id_pattern(self.request), self.request])
        if self.since_ms is not None:
            conditions.append("e.time_ms >= ?")
            parameters.append(self.since_ms)
        if self.until_ms is not None:
            conditions.append("e.time_ms < ?")
            parameters.append(self.until_ms)
        return (" WHERE " + " AND ".join(conditions) if conditions else ""), parameters

    def matches(self, event: Event) -> bool:
        """Return whether one event passes the filter (the same test as `sql`, in Python)."""
        if self.types and event.type not in self.types:
            return False
        if self.author and not (event.author.startswith(self.author) or event.author.endswith(self.author)):
            return False
        if self.request and event.id != self.request and self.request not in event.refs:
            if request_id_pattern(self.request) not in event.payload and submitted_request(event) != self.request:
                return False
        if self.since_ms is not None and event.time_ms < self.since_ms:
            return False
        return self.until_ms is None or event.time_ms < self.until_ms


@dataclass(frozen=True)
class StoredRow:
    """One row of the events table as stored, before any check (for `--verify`)."""

    rowid: int
    id: str
    author: str
    seq: int
    lamport: int
    time_ms: int
    type: str
    wire: bytes


SUBMITTED_REQUEST_FUNCTION = "cortex_submitted_request"


def submitted_request(event: Event) -> str | None:
    """Return the request id a `RequestSubmitted` event starts (from its author and nonce), else None."""
    nonce = getattr(event.body, "nonce", None) if event.type == "RequestSubmitted" else None
    return None if not isinstance(nonce, str) else _request_id_for(event.author, nonce)


def _submitted_request_of_wire(author: str, wire: bytes) -> str | None:
    """Return the request id of a stored `RequestSubmitted` wire (the SQL function of `EventFilter`)."""
    try:
        nonce = orjson.loads(bytes(wire)[:-SIGNATURE_BYTES])["body"]["nonce"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return _request_id_for(author, nonce) if isinstance(nonce, str) else None


def _request_id_for(submitter: str, nonce: str) -> str:
    from cortex.scheduler.request_events import request_id_for

    return request_id_for(submitter, nonce)


def request_id_pattern(request_id: str) -> bytes:
    """Return the bytes a canonical payload holds when its body names this `request_id`."""
    return b'"request_id":"' + request_id.encode("ascii") + b'"'


def resolve_log_path(path: str | os.PathLike[str]) -> Path:
    """Return the log file for a path that names the file or a node's data directory."""
    resolved = Path(path)
    if resolved.is_dir():
        resolved = resolved / LOG_FILE_NAME
    return resolved


class LogReader:
    """A read-only connection to one log file; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 5.0) -> None:
        self.path = resolve_log_path(path)
        if not self.path.is_file():
            raise LogOpenError(
                f"log file {self.path} does not exist; pass the node's {LOG_FILE_NAME} or its data directory"
            )
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            self._connection = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            self._connection.execute("PRAGMA query_only=1")
            self._connection.create_function(SUBMITTED_REQUEST_FUNCTION, 2, _submitted_request_of_wire, deterministic=True)
            self._check_format()
        except sqlite3.DatabaseError as error:
            raise LogOpenError(f"cannot read log file {self.path}: {error}") from error

    def _check_format(self) -> None:
        columns = {row[1] for row in self._connection.execute("PRAGMA table_info(events)")}
        # A log with a `scope` column numbers request-scoped records in their own sequence, so
        # seq checks and equivocations look at swarm-scoped events only, as the Acceptor does.
        self.swarm_condition = f"scope = '{SWARM_SCOPE}'" if "scope" in columns else "1"
        version = self._connection.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in self._connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"events", "refs", "equivocations"} <= tables:
            raise LogOpenError(f"{self.path} is not a Cortex event log: it has no events, refs and equivocations tables")
        if version != FORMAT_VERSION:
            raise LogOpenError(
                f"log file {self.path} has format version {version}, this build reads {FORMAT_VERSION}; "
                "use the software version that wrote it"
            )

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Run the queries inside the block on one consistent state of the log (a read transaction)."""
        self._connection.execute("BEGIN")
        try:
            yield
        finally:
            self._connection.execute("COMMIT")

    def events_at(self, author: str, seq: int) -> int:
        """Return how many different swarm-scoped events the log holds for this author and seq."""
        query = f"SELECT COUNT(*) FROM events WHERE author = ? AND seq = ? AND {self.swarm_condition}"
        row = self._connection.execute(query, (author, seq)).fetchone()
        return int(row[0])

    def data_version(self) -> int:
        """Return SQLite's data version: it changes after another connection commits."""
        return int(self._connection.execute("PRAGMA data_version").fetchone()[0])

    def count(self, event_filter: EventFilter | None = None) -> int:
        where, parameters = (event_filter or EventFilter()).sql()
        return int(self._connection.execute("SELECT COUNT(*) FROM events AS e" + where, parameters).fetchone()[0])

    def max_rowid(self) -> int:
        """Return the highest rowid (the latest arrival), 0 for an empty log."""
        return int(self._connection.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0])

    def canonical_wires(self, event_filter: EventFilter | None = None) -> Iterator[bytes]:
        """Iterate over stored wire bytes in canonical order, undecoded."""
        where, parameters = (event_filter or EventFilter()).sql()
        for (wire,) in self._connection.execute("SELECT e.wire FROM events AS e" + where + _CANONICAL, parameters):
            yield wire

    def canonical(self, event_filter: EventFilter | None = None) -> Iterator[Event]:
        """Iterate over decoded events in canonical order; signatures are not checked."""
        for wire in self.canonical_wires(event_filter):
            yield decode_stored(wire)

    def arrivals(self, event_filter: EventFilter | None = None, after_rowid: int = 0) -> Iterator[tuple[int, Event]]:
        """Iterate over (rowid, event) in arrival order, after a rowid."""
        where, parameters = (event_filter or EventFilter()).sql()
        where = (where + " AND" if where else " WHERE") + " e.rowid > ?"
        query = "SELECT e.rowid, e.wire FROM events AS e" + where + " ORDER BY e.rowid"
        for rowid, wire in self._connection.execute(query, [*parameters, after_rowid]):
            yield rowid, decode_stored(wire)

    def arrivals_batch(self, event_filter: EventFilter | None, after_rowid: int) -> tuple[list[tuple[int, Event]], int]:
        """Return the matching events after a rowid and the highest rowid, from one snapshot.

        A follower passes the returned rowid next time, so events that the filter left out
        are not read again.
        """
        with self.snapshot():
            events = list(self.arrivals(event_filter, after_rowid))
            highest = max(self.max_rowid(), after_rowid)
        return events, highest

    def last_arrivals(self, count: int, event_filter: EventFilter | None = None) -> list[tuple[int, Event]]:
        """Return the last `count` matching events in arrival order."""
        where, parameters = (event_filter or EventFilter()).sql()
        query = "SELECT e.rowid, e.wire FROM events AS e" + where + " ORDER BY e.rowid DESC LIMIT ?"
        rows = self._connection.execute(query, [*parameters, count]).fetchall()
        return [(rowid, decode_stored(wire)) for rowid, wire in reversed(rows)]

    def canonical_keys(self) -> Iterator[tuple[str, str, str, int]]:
        """Iterate over (id, type, author, seq) in canonical order, without decoding events."""
        query = "SELECT e.id, e.type, e.author, e.seq FROM events AS e" + _CANONICAL
        for stored_id, type_name, author, seq in self._connection.execute(query):
            yield bytes(stored_id).hex(), type_name, author, seq

    def get(self, event_id: str) -> Event | None:
        row = self._connection.execute("SELECT wire FROM events WHERE id = ?", (bytes.fromhex(event_id),)).fetchone()
        return None if row is None else decode_stored(row[0])

    def resolve_id(self, prefix: str) -> str:
        """Return the one stored event id that starts with `prefix` (at least 4 hex digits).

        A full 64-digit id is returned as it is, stored or not: it may name a request, whose
        id need not be an event id.
        """
        prefix = prefix.lower()
        if len(prefix) == 64 and set(prefix) <= _ID_PATTERN_CHARS:
            return prefix
        if len(prefix) < 4 or len(prefix) > 64 or not set(prefix) <= _ID_PATTERN_CHARS:
            raise EventNotFound(f"{prefix!r} is not an event id or id prefix (4 to 64 lowercase hex digits)")
        low = bytes.fromhex(prefix[: len(prefix) // 2 * 2])
        high = _increment(low)
        query = "SELECT id FROM events WHERE id >= ?" + (" AND id < ?" if high else "") + " ORDER BY id"
        candidates = [row[0].hex() for row in self._connection.execute(query, [low, high] if high else [low])]
        matches = [candidate for candidate in candidates if candidate.startswith(prefix)]
        if not matches:
            raise EventNotFound(f"no event in {self.path} has an id starting with {prefix}")
        if len(matches) > 1:
            raise EventNotFound(
                f"{len(matches)} events in {self.path} have ids starting with {prefix} "
                f"({', '.join(match[:16] for match in matches[:3])}, ...); give more digits"
            )
        return matches[0]

    def naming_request(self, request_id: str) -> list[Event]:
        """Return the events whose body has `"request_id": request_id`, and its submission, in canonical order (a scan)."""
        query = (
            "SELECT e.wire FROM events AS e WHERE instr(e.wire, ?) > 0"
            f" OR (e.type = 'RequestSubmitted' AND {SUBMITTED_REQUEST_FUNCTION}(e.author, e.wire) = ?)" + _CANONICAL
        )
        rows = self._connection.execute(query, (request_id_pattern(request_id), request_id))
        return [decode_stored(wire) for (wire,) in rows]

    def canonical_index(self, event_id: str) -> int:
        """Return the position (from 0) of a stored event in canonical order."""
        row = self._connection.execute(
            "SELECT lamport, author, seq, id FROM events WHERE id = ?", (bytes.fromhex(event_id),)
        ).fetchone()
        if row is None:
            raise EventNotFound(f"no event with id {event_id} in {self.path}")
        before = self._connection.execute(
            "SELECT COUNT(*) FROM events WHERE (lamport, author, seq, id) < (?, ?, ?, ?)", row
        ).fetchone()[0]
        return int(before)

    def disputed_keys(self) -> set[tuple[str, int]]:
        """Return every (author, seq) that has two or more different swarm-scoped events: equivocations."""
        rows = self._connection.execute(
            f"SELECT author, seq FROM events WHERE {self.swarm_condition} GROUP BY author, seq HAVING COUNT(*) > 1"
        )
        return {(author, seq) for author, seq in rows}

    def recorded_equivocations(self) -> list[Equivocation]:
        """Return the equivocations the node recorded when it accepted the events."""
        rows = self._connection.execute(
            "SELECT author, seq, first_id, second_id FROM equivocations ORDER BY author, seq, first_id, second_id"
        )
        return [Equivocation(author, seq, first.hex(), second.hex()) for author, seq, first, second in rows]

    def author_seqs(self) -> dict[str, list[int]]:
        """Map each author to its distinct stored swarm-scoped seqs, ascending."""
        seqs: dict[str, list[int]] = {}
        query = f"SELECT DISTINCT author, seq FROM events WHERE {self.swarm_condition} ORDER BY author, seq"
        for author, seq in self._connection.execute(query):
            seqs.setdefault(author, []).append(seq)
        return seqs

    def rows(self) -> Iterator[StoredRow]:
        """Iterate over the stored rows as they are, in rowid order, for checking."""
        query = "SELECT rowid, id, author, seq, lamport, time_ms, type, wire FROM events ORDER BY rowid"
        for rowid, stored_id, author, seq, lamport, time_ms, type_name, wire in self._connection.execute(query):
            yield StoredRow(rowid, bytes(stored_id).hex(), author, seq, lamport, time_ms, type_name, bytes(wire))

    def refs_by_rowid(self) -> Iterator[tuple[int, set[str]]]:
        """Iterate over (rowid, ids in the refs table) in rowid order, for rows that have refs."""
        current: int | None = None
        refs: set[str] = set()
        for rowid, ref in self._connection.execute("SELECT event_rowid, ref FROM refs ORDER BY event_rowid"):
            if rowid != current:
                if current is not None:
                    yield current, refs
                current, refs = rowid, set()
            refs.add(bytes(ref).hex())
        if current is not None:
            yield current, refs

    def query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query over the log's tables (for checks that are clearest in SQL)."""
        return self._connection.execute(sql, parameters).fetchall()

    def stored_ids(self) -> set[str]:
        return {bytes(row[0]).hex() for row in self._connection.execute("SELECT id FROM events")}

    def integrity_check(self) -> str:
        """Run SQLite's integrity check; return "ok" or the problems it found."""
        return "\n".join(str(row[0]) for row in self._connection.execute("PRAGMA integrity_check"))


def decode_stored(wire: bytes) -> Event:
    """Decode stored wire bytes without checking the signature (`--verify` checks it)."""
    try:
        return parse_event(bytes(wire))
    except EventRejected as error:
        raise LogOpenError(
            f"a stored event no longer decodes with this build's event types ({error}); "
            "run `cortex replay LOG --verify` to list such events"
        ) from error


def _increment(prefix: bytes) -> bytes | None:
    """Return the smallest byte string above every string that starts with `prefix`, or None."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return None
