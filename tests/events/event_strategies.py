"""Hypothesis strategies for the bodies of every membership and shard event type."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from events import (
    Identity,
    PeerHeartbeat,
    PeerJoined,
    PeerLeft,
    SequenceSkipped,
    ShardClaimed,
    ShardLoaded,
    ShardReleased,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
NON_NEGATIVE = st.integers(min_value=0, max_value=2**63 - 1)
TEXT = st.text(max_size=40)
EVENT_IDS = st.binary(min_size=32, max_size=32).map(bytes.hex)


def fragments() -> st.SearchStrategy[str]:
    small = st.integers(min_value=0, max_value=200)
    blocks = st.tuples(small, small).filter(lambda pair: pair[0] < pair[1]).map(lambda pair: f"block[{pair[0]}:{pair[1]}]")
    experts = st.tuples(small, small).map(lambda pair: f"expert[{pair[0]}][{pair[1]}]")
    return st.one_of(st.just("head"), blocks, experts)


HARDWARE = st.dictionaries(TEXT, st.one_of(INT64, TEXT, st.booleans()), max_size=5)
MODEL_IDS = st.text(min_size=1, max_size=64)

def skipped_ranges(seq: int) -> st.SearchStrategy[SequenceSkipped]:
    """Return SequenceSkipped bodies valid at `seq`: 1 <= first <= last < seq (none at seq 1)."""
    if seq < 2:
        return st.nothing()
    below = st.integers(min_value=1, max_value=seq - 1)
    return st.tuples(below, below).map(lambda pair: SequenceSkipped(first=min(pair), last=max(pair)))


def body_strategies(identity: Identity, seq: int) -> dict[type, st.SearchStrategy[Any]]:
    """Return a strategy per event type for bodies that `identity` may sign at `seq`."""
    return {
        PeerJoined: st.builds(
            PeerJoined,
            bus_addresses=st.lists(TEXT, max_size=3).map(tuple),
            data_endpoint=TEXT,
            curve_public_key=st.just(identity.curve_public_key.decode()),
            hardware=HARDWARE,
            protocol_version=TEXT,
            software_version=TEXT,
        ),
        PeerHeartbeat: st.just(PeerHeartbeat(seq - 1)),
        PeerLeft: st.builds(PeerLeft, reason=TEXT),
        SequenceSkipped: skipped_ranges(seq),
        ShardClaimed: st.builds(ShardClaimed, model_id=MODEL_IDS, fragment=fragments(), memory_bytes=NON_NEGATIVE),
        ShardLoaded: st.builds(ShardLoaded, model_id=MODEL_IDS, fragment=fragments(), memory_bytes=NON_NEGATIVE),
        ShardReleased: st.builds(ShardReleased, model_id=MODEL_IDS, fragment=fragments(), reason=TEXT),
    }


def bodies(identity: Identity, seq: int) -> st.SearchStrategy[Any]:
    """Return a strategy for a body of any membership or shard type."""
    return st.one_of(*body_strategies(identity, seq).values())
