"""`cortex bench events`: sign rate, accept-path rate and the raw Ed25519 verify ceiling.

The accept path is what a node runs for every event from a peer: decode, check, verify the
signature, append to the SQLite log (WAL, synchronous=NORMAL, one transaction per batch) and
fold into the Registry view. The ceiling is libsodium's verify through pynacl
(`nacl.bindings.crypto_sign_open`) on the same events, measured in the same process, batch by
batch alternating with the accept path, so the ratio is comparable across machines. The
process is pinned to one CPU core where the OS allows it. Each figure is the best of its
rounds, because other processes on a shared machine only ever slow a round down.

The own-write figure is `EventWriter.write` as a node runs it: sign, append with
synchronous=NORMAL, fold into the Registry, and one fsynced seq reservation per
`SEQ_RESERVATION_BLOCK` events. Each round writes as many own events as it accepts, so the
reservations' fsyncs are part of the figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit

logger = logging.getLogger(__name__)

ACCEPT_TARGET_RATIO = 0.40


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "events",
        help="events/s for signing, the accept path and raw Ed25519 verification",
        description=(
            "Measure events/s for signing, for the whole accept path (decode, verify, append to the "
            "SQLite WAL log, apply to the Registry view) on one core, and raw pynacl Ed25519 verification "
            "in the same run. Goal: accept path >= 40%% of raw verification."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument("--events", type=int, default=4000, help="events per round (default: 4000; 1000 with --quick)")
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds, best taken (default: 3; 2 with --quick)")
    parser.add_argument("--batch", type=int, default=256, help="events per accept_many transaction (default: 256)")
    parser.add_argument("--authors", type=int, default=16, help="distinct signing peers (default: 16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    count = 1000 if args.quick and args.events == 4000 else args.events
    rounds = 2 if args.quick and args.rounds == 3 else args.rounds
    if count < 1 or rounds < 1 or args.batch < 1 or args.authors < 1:
        raise SystemExit("--events, --rounds, --batch and --authors must be at least 1")
    pinned = _pin_to_one_core()
    report = BenchReport("events")
    with tempfile.TemporaryDirectory(prefix="cortex-bench-events-") as directory:
        figures = _measure(Path(directory), count, rounds, args.batch, args.authors)
    report.results.update(figures)
    report.results["pinned_cpu"] = pinned if pinned is not None else "not pinned"
    report.goals.append(
        Goal(
            "accept path vs raw verify (one core)",
            figures["accept_events_per_s"] / figures["raw_verify_per_s"],
            ACCEPT_TARGET_RATIO,
        )
    )
    return emit(report, args.json)


def _pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        logger.warning("this OS cannot pin a process to one core; the accept path runs unpinned")
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def _best_rate(rounds: list[float], count: int) -> float:
    return count / min(rounds)


def _measure(directory: Path, count: int, rounds: int, batch: int, author_count: int) -> dict[str, Any]:
    from cortex.registry import RegistryReducer
    from events import (
        LAMPORT_RESERVATION_BLOCK,
        SEQ_RESERVATION_BLOCK,
        Acceptor,
        EventWriter,
        Identity,
        LogStore,
        PeerHeartbeat,
        Projection,
    )

    authors = [Identity.generate() for _ in range(author_count)]
    timings: dict[str, list[float]] = {"sign": [], "verify": [], "accept": [], "accept_single": [], "own": []}
    payload_bytes = 0
    for round_index in range(rounds):
        started = time.perf_counter()
        events = _sign_stream(authors, count, round_index)
        timings["sign"].append(time.perf_counter() - started)
        payload_bytes = sum(len(event.payload) for event in events) // len(events)
        wires = [event.wire for event in events]

        verify_seconds, accept_seconds = _time_verify_and_accept(directory / f"batch{round_index}.db", events, batch)
        timings["verify"].append(verify_seconds)
        timings["accept"].append(accept_seconds)
        single_count = max(1, count // 4)
        timings["accept_single"].append(_time_accept(directory / f"single{round_index}.db", wires[:single_count], 1))

        with LogStore(directory / f"own{round_index}.db") as store:
            writer = EventWriter(authors[0], Acceptor(store, [Projection(RegistryReducer())], own_peer_id=authors[0].peer_id))
            started = time.perf_counter()
            for _ in range(count):
                writer.write(PeerHeartbeat(writer.last_seq))
            timings["own"].append(time.perf_counter() - started)
            writer.close()
            settings = store.settings

    single_count = max(1, count // 4)
    return {
        "events_per_round": count,
        "rounds": rounds,
        "authors": author_count,
        "batch_size": batch,
        "payload_bytes_mean": payload_bytes,
        "sign_events_per_s": _best_rate(timings["sign"], count),
        "raw_verify_per_s": _best_rate(timings["verify"], count),
        "accept_events_per_s": _best_rate(timings["accept"], count),
        "accept_single_events_per_s": _best_rate(timings["accept_single"], single_count),
        "own_write_events_per_s": _best_rate(timings["own"], count),
        "sqlite_journal_mode": settings["journal_mode"],
        "sqlite_synchronous_peer_events": settings["synchronous_peer_events"],
        "sqlite_synchronous_own_events": settings["synchronous_own_events"],
        "sqlite_synchronous_seq_reservations": settings["synchronous_seq_reservations"],
        "seq_reservation_block": SEQ_RESERVATION_BLOCK,
        "lamport_reservation_block": LAMPORT_RESERVATION_BLOCK,
        "sqlite_version": sqlite3.sqlite_version,
    }


def _sign_stream(authors: list[Any], count: int, round_index: int) -> list[Any]:
    """Sign a realistic mix: each author joins, claims and loads shards, then heartbeats."""
    from events import PeerHeartbeat, PeerJoined, ShardClaimed, ShardLoaded, sign_event

    events = []
    seqs = [0] * len(authors)
    base_ms = 1_700_000_000_000 + round_index
    for index in range(count):
        slot = index % len(authors)
        author = authors[slot]
        seqs[slot] += 1
        seq = seqs[slot]
        body: Callable[[], Any]
        if seq == 1:
            body = lambda: PeerJoined(  # noqa: E731
                (f"/ip4/127.0.0.1/tcp/{4000 + slot}",),
                f"tcp://127.0.0.1:{5000 + slot}",
                author.curve_public_key.decode(),
                {"cores": 16, "memory_bytes": 137_438_953_472, "accelerator": "none"},
                "1.0",
                "0.1.0",
            )
        elif seq % 8 == 2:
            body = lambda: ShardClaimed("model-" + "ab" * 16, f"block[{seq}:{seq + 4}]", 1_073_741_824)  # noqa: E731
        elif seq % 8 == 3:
            body = lambda: ShardLoaded("model-" + "ab" * 16, f"block[{seq - 1}:{seq + 3}]", 1_073_741_824)  # noqa: E731
        else:
            body = lambda: PeerHeartbeat(seq - 1)  # noqa: E731
        events.append(sign_event(author, body(), seq=seq, lamport=index + 1, time_ms=base_ms + index))
    return events


def _time_verify_and_accept(path: Path, events: list[Any], batch: int) -> tuple[float, float]:
    """Time raw verification and the accept path batch by batch, alternating.

    Alternating per batch exposes both figures to the same load from other processes,
    which keeps their ratio steady on a shared machine.
    """
    import nacl.bindings

    from cortex.registry import RegistryReducer
    from events import Acceptor, LogStore, Projection, public_key_from_peer_id

    # Prepared outside the timed loop: the (signed message, key) pairs libsodium takes.
    prepared = [(event.signature + event.payload, public_key_from_peer_id(event.author)) for event in events]
    wires = [event.wire for event in events]
    verify = nacl.bindings.crypto_sign_open
    verify_seconds = accept_seconds = 0.0
    with LogStore(path) as store:
        acceptor = Acceptor(store, [Projection(RegistryReducer())])
        for start in range(0, len(events), batch):
            started = time.perf_counter()
            for signed, public_key in prepared[start : start + batch]:
                verify(signed, public_key)
            verify_seconds += time.perf_counter() - started

            started = time.perf_counter()
            acceptor.accept_many(wires[start : start + batch])
            accept_seconds += time.perf_counter() - started
        _check_all_accepted(acceptor, len(wires))
    return verify_seconds, accept_seconds


def _time_accept(path: Path, wires: list[bytes], batch: int) -> float:
    from cortex.registry import RegistryReducer
    from events import Acceptor, LogStore, Projection

    with LogStore(path) as store:
        acceptor = Acceptor(store, [Projection(RegistryReducer())])
        started = time.perf_counter()
        for start in range(0, len(wires), batch):
            acceptor.accept_many(wires[start : start + batch])
        elapsed = time.perf_counter() - started
        _check_all_accepted(acceptor, len(wires))
    return elapsed


def _check_all_accepted(acceptor: Any, expected: int) -> None:
    accepted = acceptor.counters["accepted"]
    if accepted != expected:
        raise RuntimeError(f"bench accepted {accepted} of {expected} events; counters: {dict(acceptor.counters)}")
