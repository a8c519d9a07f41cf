"""BusTail: gossip frames to printed events, with signature checks, deduplication and filters."""

from __future__ import annotations

import orjson
import pytest
from conftest import Scenario

from cortex.bus import frames
from events import Event, Identity
from replay.bus_tail import BusAddressError, BusTail, transport_for
from replay.reader import EventFilter, decode_stored
from replay.render import event_line


def test_bus_tail_prints_each_event_once(scenario: Scenario) -> None:
    printed: list[Event] = []
    tail = BusTail(EventFilter(), printed.append)
    wires = [event.wire for event in scenario.events]
    tail.on_frame(frames.encode_events(wires[:6]))
    tail.on_frame(frames.encode_events(wires[4:]))
    assert [event.id for event in printed] == [event.id for event in scenario.events]
    assert tail.printed == len(scenario.events)


def test_bus_tail_skips_forged_and_bad_frames(scenario: Scenario, identities: list[Identity]) -> None:
    printed: list[Event] = []
    tail = BusTail(EventFilter(), printed.append)
    genuine = scenario.events[0]
    forged = genuine.payload + identities[1].sign(genuine.payload)
    tail.on_frame(frames.encode_events([forged, b"not an event" + bytes(64), scenario.events[1].wire]))
    tail.on_frame(b"XX garbage")
    tail.on_frame(frames.encode_heads({"someone": 3}))
    assert [event.id for event in printed] == [scenario.events[1].id]
    assert tail.rejected["bad_signature"] == 1
    assert tail.rejected["malformed"] == 1
    assert tail.rejected["bad_frame"] == 1


def test_bus_tail_applies_filters(scenario: Scenario) -> None:
    printed: list[Event] = []
    author = scenario.authors[1].peer_id
    tail = BusTail(EventFilter(types=("ShardLoaded",), author=author[-8:]), printed.append)
    tail.on_frame(frames.encode_events([event.wire for event in scenario.events]))
    assert printed
    assert all(event.type == "ShardLoaded" for event in printed)
    assert all(event.author == author for event in printed)


def test_bus_address_forms() -> None:
    with pytest.raises(BusAddressError, match="neither a NATS URL"):
        transport_for("http://127.0.0.1:4222")
    with pytest.raises(BusAddressError):
        transport_for("/ip4/127.0.0.1/tcp/4001")
    assert type(transport_for("nats://127.0.0.1:4222")).__name__ == "NatsTransport"


def test_event_line_of_unknown_type(identities: list[Identity]) -> None:
    """A type this build does not know is shown from its signed fields."""
    author = identities[0]
    payload = orjson.dumps({
        "author": author.peer_id, "body": {"votes": 3, "digest": "ab" * 32}, "lamport": 1, "refs": [], "seq": 1,
        "time_ms": 1_000, "type": "QuorumVotedLater", "version": "1.9",
    }, option=orjson.OPT_SORT_KEYS)
    event = decode_stored(payload + author.sign(payload))
    assert not event.is_known_type
    line = event_line(event).plain
    assert "QuorumVotedLater" in line
    assert "digest=abababababab" in line
    assert "votes=3" in line
