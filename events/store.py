"""Log store: every accepted event of one node, in one SQLite file.

File format (SQLite, `PRAGMA user_version = 1`):

    events(rowid, id BLOB UNIQUE, author, seq, lamport, time_ms, type, wire BLOB, scope)
    refs(ref BLOB, event_rowid)           one row per id in an event's refs
    equivocations(author, seq, first_id, second_id)
    seq_reservations(author PRIMARY KEY, seq_up_to, lamport_up_to, boot_id)

`id` is the 32-byte BLAKE2b-256 of the payload (see `events.codec`), `wire` the exact bytes
received, from which every Event is decoded again. `(author, seq)` is not unique, because
two events with one author and seq (equivocation) are both kept as evidence. Iteration is in
the canonical order (lamport, author, seq), which is also the replay order.
`seq_reservations` contains the node's own `EventWriter` reservation (see `events.writer`). It
was added to format version 1 as a new table, created when missing, so files written before
it still open and readers of the other tables need no change.
`scope` is `swarm` or `request` (see `events.model`): each author numbers its events in one
sequence per scope, so `(author, scope, seq)` names an event slot. Seq gaps, heads and
anti-entropy (`max_seq`, `missing_ranges`, `wires`) look at the swarm scope only;
iteration (`events`) returns both. The column was also added to format version 1 (with
default `swarm`, which every event before it was), and the request sequence's writer
reservation is stored under `request_reservation_key(author)`.

Durability settings, chosen for crash safety at the lowest cost:

- `journal_mode=WAL`: readers do not block the writer, and a commit appends to the WAL, so
  a process killed at any point (SIGKILL included) leaves a database that opens cleanly
  and holds every committed transaction.
- `synchronous=NORMAL` for every event, the node's own included: a commit is not fsynced.
  It survives a process crash and SIGKILL, because the WAL write is in the OS page cache,
  but power loss or an OS crash may drop the last commits. SQLite's WAL recovery keeps
  only a prefix of the commits, because each frame's checksum covers every frame before
  it (the header comment of SQLite's src/wal.c describes this), so what survives has no
  holes.
  A lost peer event shows up as a gap (`missing_ranges`) and is fetched again from peers.
- `synchronous=FULL` for transactions opened with `durable=True`, which `reserve_seqs`
  uses. The WAL is fsynced before the commit returns, which also makes every earlier
  NORMAL commit durable. `EventWriter` reserves a block of seqs this way before it signs
  any of them, so a seq that was published is covered by a reservation even after power
  loss, and the writer never reuses it.

One LogStore is one connection. It is not thread-safe: use it from one thread at a time.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from events.codec import Event, parse_event
from events.errors import EventRejected, LogStoreError
from events.membership import SequenceSkipped
from events.model import REQUEST_SCOPE, SWARM_SCOPE, scope_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
JOURNAL_MODE = "wal"
SYNCHRONOUS = "NORMAL"
SYNCHRONOUS_DURABLE = "FULL"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    rowid INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    author TEXT NOT NULL,
    seq INTEGER NOT NULL,
    lamport INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    wire BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_canonical ON events (lamport, author, seq);
CREATE INDEX IF NOT EXISTS events_type ON events (type);
CREATE INDEX IF NOT EXISTS events_time ON events (time_ms);
CREATE TABLE IF NOT EXISTS refs (
    ref BLOB NOT NULL,
    event_rowid INTEGER NOT NULL REFERENCES events (rowid),
    PRIMARY KEY (ref, event_rowid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS equivocations (
    author TEXT NOT NULL,
    seq INTEGER NOT NULL,
    first_id BLOB NOT NULL,
    second_id BLOB NOT NULL,
    PRIMARY KEY (author, seq, first_id, second_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seq_reservations (
    author TEXT PRIMARY KEY,
    seq_up_to INTEGER NOT NULL,
    lamport_up_to INTEGER NOT NULL,
    boot_id TEXT
) WITHOUT ROWID;
"""

# Run after the `scope` column exists, which an older file gets from `_add_scope_column`.
_SCOPE_SCHEMA = """
DROP INDEX IF EXISTS events_author_seq;
CREATE INDEX IF NOT EXISTS events_author_scope_seq ON events (author, scope, seq);
"""

_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (id, author, seq, lamport, time_ms, type, wire, scope) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_REF = "INSERT OR IGNORE INTO refs (ref, event_rowid) VALUES (?, ?)"
_CANONICAL = " ORDER BY e.lamport, e.author, e.seq"


@dataclass(frozen=True, slots=True)
class SeqReservation:
    """The seqs and Lamport clocks an author's writer may sign without another fsync.

    Every own event the writer signed has `seq <= seq_up_to` and `lamport <= lamport_up_to`.
    `boot_id` is the OS boot the reservation was made in (None where the OS has no boot id).
    """

    seq_up_to: int
    lamport_up_to: int
    boot_id: str | None


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Two different events by one author with one seq; ids sorted so each pair has one form."""

    author: str
    seq: int
    first_id: str
    second_id: str


class LogStore:
    """The node's event log in one SQLite file (WAL); see the module docstring for the format."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError as error:
            raise LogStoreError(f"cannot open log store {self.path}: {error}") from error
        try:
            self._open()
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise LogStoreError(f"cannot open log store {self.path}: {error}") from error
        except LogStoreError:
            self._connection.close()
            raise
        self._in_transaction = False
        self._max_seq: dict[str, int] = {}
        self._max_request_seq: dict[str, int] = {}
        heads = self._connection.execute("SELECT author, scope, MAX(seq) FROM events GROUP BY author, scope")
        for author, scope, seq in heads:
            (self._max_request_seq if scope == REQUEST_SCOPE else self._max_seq)[author] = seq

    def _open(self) -> None:
        connection = self._connection
        mode = connection.execute(f"PRAGMA journal_mode={JOURNAL_MODE}").fetchone()[0]
        if mode != JOURNAL_MODE:
            raise LogStoreError(f"log store {self.path} is in journal mode {mode!r}; WAL is required")
        connection.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, FORMAT_VERSION):
            raise LogStoreError(
                f"log store {self.path} has format version {version}, this build reads {FORMAT_VERSION}; "
                "use the software that wrote it or start a new log and fetch events from peers"
            )
        connection.executescript(_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
        if "scope" not in columns:
            connection.execute(f"ALTER TABLE events ADD COLUMN scope TEXT NOT NULL DEFAULT '{SWARM_SCOPE}'")
        connection.executescript(_SCOPE_SCHEMA)
        connection.execute(f"PRAGMA user_version={FORMAT_VERSION}")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def settings(self) -> dict[str, str]:
        """The durability settings in force, as recorded in bench results."""
        return {
            "journal_mode": self._connection.execute("PRAGMA journal_mode").fetchone()[0],
            "synchronous_peer_events": SYNCHRONOUS,
            "synchronous_own_events": SYNCHRONOUS,
            "synchronous_seq_reservations": SYNCHRONOUS_DURABLE,
        }

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[None]:
        """Group inserts into one transaction; with `durable`, fsync the WAL at commit."""
        if self._in_transaction:
            raise LogStoreError("log store transactions do not nest")
        connection = self._connection
        if durable:
            connection.execute(f"PRAGMA synchronous={SYNCHRONOUS_DURABLE}")
        max_seq_before = dict(self._max_seq), dict(self._max_request_seq)
        connection.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            self._max_seq, self._max_request_seq = max_seq_before
            raise
        finally:
            self._in_transaction = False
            if durable:
                connection.execute(f"PRAGMA synchronous={SYNCHRONOUS}")

    def insert(self, event: Event) -> bool:
        """Insert one event inside `transaction()`; return False if its id is already stored."""
        scope = scope_of(event.type)
        cursor = self._connection.execute(
            _INSERT_EVENT,
            (bytes.fromhex(event.id), event.author, event.seq, event.lamport, event.time_ms, event.type, event.wire, scope),
        )
        if cursor.rowcount != 1:
            return False
        if event.refs:
            rowid = cursor.lastrowid
            self._connection.executemany(_INSERT_REF, [(bytes.fromhex(ref), rowid) for ref in event.refs])
        heads = self._max_request_seq if scope == REQUEST_SCOPE else self._max_seq
        if event.seq > heads.get(event.author, 0):
            heads[event.author] = event.seq
        return True

    def append(self, event: Event, durable: bool = False) -> bool:
        """Insert one event in its own transaction; return False if it was already stored."""
        with self.transaction(durable=durable):
            return self.insert(event)

    def seq_reservation(self, author: str) -> SeqReservation | None:
        """Return the stored reservation of `author`'s writer, None if it never reserved."""
        row = self._connection.execute(
            "SELECT seq_up_to, lamport_up_to, boot_id FROM seq_reservations WHERE author = ?", (author,)
        ).fetchone()
        return None if row is None else SeqReservation(row[0], row[1], row[2])

    def reserve_seqs(self, author: str, reservation: SeqReservation) -> None:
        """Store `author`'s reservation in its own durable (fsynced) transaction.

        It replaces the previous one, lower bounds included: `EventWriter.close` lowers it to
        release the seqs it did not use.
        """
        with self.transaction(durable=True):
            self._connection.execute(
                "INSERT OR REPLACE INTO seq_reservations (author, seq_up_to, lamport_up_to, boot_id) VALUES (?, ?, ?, ?)",
                (author, reservation.seq_up_to, reservation.lamport_up_to, reservation.boot_id),
            )

    def record_equivocation(self, author: str, seq: int, id_a: str, id_b: str) -> Equivocation:
        """Record that two events share one author and seq (idempotent)."""
        first, second = sorted((id_a, id_b))
        self._connection.execute(
            "INSERT OR IGNORE INTO equivocations VALUES (?, ?, ?, ?)",
            (author, seq, bytes.fromhex(first), bytes.fromhex(second)),
        )
        return Equivocation(author, seq, first, second)

    def equivocations(self) -> list[Equivocation]:
        """Return every recorded equivocation, ordered by author and seq."""
        rows = self._connection.execute(
            "SELECT author, seq, first_id, second_id FROM equivocations ORDER BY author, seq, first_id, second_id"
        )
        return [Equivocation(author, seq, first.hex(), second.hex()) for author, seq, first, second in rows]

    def disputed_seqs(self) -> dict[str, int]:
        """Map each equivocating author to its lowest disputed seq (what views skip from)."""
        rows = self._connection.execute("SELECT author, MIN(seq) FROM equivocations GROUP BY author")
        return {author: seq for author, seq in rows}

    def max_seq(self, author: str, scope: str = SWARM_SCOPE) -> int:
        """Return the highest seq stored for `author` in `scope` (the swarm sequence by default), 0 if none."""
        return (self._max_request_seq if scope == REQUEST_SCOPE else self._max_seq).get(author, 0)

    def max_lamport(self) -> int:
        """Return the highest Lamport clock in the log, 0 if the log is empty."""
        row = self._connection.execute("SELECT MAX(lamport) FROM events").fetchone()
        return int(row[0] or 0)

    def stored_at(self, author: str, seq: int, scope: str = SWARM_SCOPE) -> list[tuple[str, bytes]]:
        """Return (id, wire) of every stored event with this author, scope and seq (two or more: equivocation)."""
        rows = self._connection.execute(
            "SELECT id, wire FROM events WHERE author = ? AND scope = ? AND seq = ?", (author, scope, seq)
        )
        return [(event_id.hex(), wire) for event_id, wire in rows]

    def get(self, event_id: str) -> Event | None:
        """Return the event with this id, or None if it is not stored."""
        row = self._connection.execute("SELECT wire FROM events WHERE id = ?", (bytes.fromhex(event_id),)).fetchone()
        return None if row is None else _decode_stored(row[0])

    def __contains__(self, event_id: str) -> bool:
        row = self._connection.execute("SELECT 1 FROM events WHERE id = ?", (bytes.fromhex(event_id),)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return int(self._connection.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def authors(self) -> list[str]:
        """Return every author with at least one stored swarm-scoped event, sorted."""
        return sorted(self._max_seq)

    def events(
        self,
        *,
        type: str | None = None,
        author: str | None = None,
        ref: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        scope: str | None = None,
    ) -> Iterator[Event]:
        """Iterate over stored events in canonical order (lamport, author, seq), filtered.

        `type` and `author` match exactly, `ref` selects events whose refs contain that id
        (all events of one request, for example), and `since_ms <= time_ms < until_ms`
        selects an author-clock time range, `scope` one scope (both by default). Filters
        combine with AND.
        """
        query, parameters = _select_events(type, author, ref, since_ms, until_ms, scope)
        for (wire,) in self._connection.execute(query, parameters):
            yield _decode_stored(wire)

    def ids(self, *, ref: str, types: Iterable[str]) -> list[str]:
        """Return the ids of the stored events of `types` whose refs contain `ref`, in canonical order.

        The same selection as `events(ref=...)` filtered by type, without decoding any event.
        """
        names = sorted(set(types))
        if not names:
            return []
        query = (
            "SELECT e.id FROM events AS e JOIN refs AS r ON r.event_rowid = e.rowid"
            f" WHERE r.ref = ? AND e.type IN ({', '.join('?' * len(names))})" + _CANONICAL
        )
        rows = self._connection.execute(query, [bytes.fromhex(ref), *names])
        return [event_id.hex() for (event_id,) in rows]

    def wires(self, *, author: str | None = None, first_seq: int = 1, last_seq: int | None = None) -> Iterator[bytes]:
        """Iterate over stored swarm-scoped wire bytes by author and seq range (for anti-entropy replies)."""
        query = "SELECT wire FROM events WHERE scope = ? AND seq >= ?"
        parameters: list[Any] = [SWARM_SCOPE, first_seq]
        if author is not None:
            query += " AND author = ?"
            parameters.append(author)
        if last_seq is not None:
            query += " AND seq <= ?"
            parameters.append(last_seq)
        for (wire,) in self._connection.execute(query + " ORDER BY author, seq", parameters):
            yield wire

    def missing_ranges(self, author: str, up_to: int | None = None) -> list[tuple[int, int]]:
        """Return the seq ranges (first, last), inclusive, missing from `author`'s swarm-scoped events.

        Seqs start at 1. Without `up_to` only gaps below the highest stored seq count; with
        it (the `latest_seq` of a heartbeat, say) missing trailing events count too. Ranges
        that the author voided with a stored `SequenceSkipped` event (`skipped_ranges`) are
        not missing: the author will never sign them, and the events from them that it did
        publish before losing them are ordinary events wherever they are stored.
        """
        rows = self._connection.execute(
            "SELECT seq, LEAD(seq) OVER (ORDER BY seq) FROM (SELECT DISTINCT seq FROM events WHERE author = ? AND scope = ?)",
            (author, SWARM_SCOPE),
        ).fetchall()
        ranges: list[tuple[int, int]] = []
        if rows and rows[0][0] > 1:
            ranges.append((1, rows[0][0] - 1))
        for seq, next_seq in rows:
            if next_seq is not None and next_seq > seq + 1:
                ranges.append((seq + 1, next_seq - 1))
        highest = rows[-1][0] if rows else 0
        if up_to is not None and up_to > highest:
            ranges.append((highest + 1, up_to))
        if not ranges:
            return ranges
        return _subtract_ranges(ranges, self.skipped_ranges(author))

    def skipped_ranges(self, author: str) -> list[tuple[int, int]]:
        """Return the seq ranges (first, last) that `author` voided, merged and sorted.

        Only the author's own stored `SequenceSkipped` events count, because no other peer can
        sign for it.
        """
        rows = self._connection.execute(
            "SELECT wire FROM events WHERE author = ? AND type = ?", (author, SequenceSkipped.__name__)
        )
        declared: list[tuple[int, int]] = []
        for (wire,) in rows:
            body = _decode_stored(wire).body
            if isinstance(body, SequenceSkipped):
                declared.append((body.first, body.last))
        return _merge_ranges(declared)

    def integrity_check(self) -> str:
        """Run SQLite's integrity check; return "ok" or the problems it found."""
        rows = self._connection.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)


def request_reservation_key(author: str) -> str:
    """Return the `seq_reservations` key of `author`'s request-sequence reservation."""
    return f"{author}/{REQUEST_SCOPE}"


def _select_events(
    type_name: str | None,
    author: str | None,
    ref: str | None,
    since_ms: int | None,
    until_ms: int | None,
    scope: str | None = None,
) -> tuple[str, list[Any]]:
    query = "SELECT e.wire FROM events AS e"
    conditions: list[str] = []
    parameters: list[Any] = []
    if ref is not None:
        query += " JOIN refs AS r ON r.event_rowid = e.rowid"
        conditions.append("r.ref = ?")
        parameters.append(bytes.fromhex(ref))
    for condition, value in (
        ("e.type = ?", type_name),
        ("e.author = ?", author),
        ("e.time_ms >= ?", since_ms),
        ("e.time_ms < ?", until_ms),
        ("e.scope = ?", scope),
    ):
        if value is not None:
            conditions.append(condition)
            parameters.append(value)
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    return query + _CANONICAL, parameters


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort inclusive ranges and merge those that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _subtract_ranges(ranges: list[tuple[int, int]], removed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the parts of sorted, disjoint inclusive `ranges` outside sorted, disjoint `removed`."""
    result: list[tuple[int, int]] = []
    for first, last in ranges:
        for removed_first, removed_last in removed:
            if removed_last < first or removed_first > last:
                continue
            if removed_first > first:
                result.append((first, removed_first - 1))
            first = removed_last + 1
            if first > last:
                break
        if first <= last:
            result.append((first, last))
    return result


def _decode_stored(wire: bytes) -> Event:
    # Stored events passed every check when they arrived, so the signature is not checked
    # again. Decoding still runs the schema checks, which can fail only if this build's
    # types changed incompatibly since the event was stored.
    try:
        return parse_event(wire)
    except EventRejected as error:
        raise LogStoreError(f"stored event no longer decodes with this build's event types: {error}") from error
