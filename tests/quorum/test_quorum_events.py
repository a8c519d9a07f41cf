"""Quorum event types: codec round trips and field checks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.quorum import NOT_FINITE, PeerPenalized, QuorumDecided, QuorumVoted
from events import Identity, decode_event, sign_event
from events.model import SchemaViolation

IDENTITY = Identity.generate()
PEERS = [Identity.generate().peer_id for _ in range(4)]
HEX = st.binary(min_size=32, max_size=32).map(bytes.hex)
SMALL = st.integers(min_value=0, max_value=10_000)


@st.composite
def votes(draw: st.DrawFn) -> QuorumVoted:
    count = draw(st.integers(min_value=1, max_value=4))
    experts = tuple(draw(st.lists(SMALL, min_size=count, max_size=count, unique=True)))
    layer = draw(SMALL)
    return QuorumVoted(
        request_id=draw(HEX),
        model_id=draw(st.text(min_size=1, max_size=64)),
        step=draw(SMALL),
        layer=layer,
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        tolerance_nano=draw(SMALL),
        experts=experts,
        producers=tuple(draw(st.sampled_from(PEERS)) for _ in experts),
        digests=tuple(draw(HEX) for _ in experts),
        distances_nano=tuple(draw(st.one_of(SMALL, st.just(NOT_FINITE))) for _ in experts),
        spot_check_ppm=draw(st.integers(min_value=0, max_value=1_000_000)),
        spot_check_seed=draw(SMALL),
        block=draw(st.sampled_from(["", f"block[{layer}:{layer + 2}]"])),
    )


@st.composite
def decisions(draw: st.DrawFn) -> QuorumDecided:
    experts = tuple(draw(st.lists(SMALL, min_size=1, max_size=4, unique=True)))
    producers = draw(st.permutations(PEERS))
    split = draw(st.integers(min_value=0, max_value=len(producers)))
    layer = draw(SMALL)
    return QuorumDecided(
        request_id=draw(HEX),
        model_id="m",
        step=draw(SMALL),
        layer=layer,
        outcome="agreed",
        quorum=draw(st.integers(min_value=1, max_value=3)),
        rounds=draw(st.integers(min_value=1, max_value=3)),
        experts=experts,
        winner_digests=tuple(draw(HEX) for _ in experts),
        agreeing=tuple(producers[:split]),
        dissenting=tuple(producers[split:]),
        block=draw(st.sampled_from(["", f"block[{layer}:{layer + 1}]"])),
    )


penalties = st.builds(
    PeerPenalized,
    peer=st.sampled_from(PEERS),
    reason=st.sampled_from(["disagreed", "bad_frame", "equivocated", "some_newer_code"]),
    evidence=st.lists(HEX, max_size=4).map(tuple),
    detail=st.text(max_size=40),
)


@settings(max_examples=60, deadline=None)
@given(body=st.one_of(votes(), decisions(), penalties), refs=st.lists(HEX, max_size=3).map(tuple))
def test_quorum_events_round_trip(body: Any, refs: tuple[str, ...]) -> None:
    event = sign_event(IDENTITY, body, seq=3, lamport=9, time_ms=1_000, refs=refs)
    decoded = decode_event(event.wire)

    assert decoded == event
    assert decoded.body == body
    assert decoded.refs == refs


def test_vote_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per output"):
        QuorumVoted("a" * 64, "m", 0, 1, "float32", 10, (1, 2), (PEERS[0], PEERS[1]), ("b" * 64,), (0, 0))


def test_vote_rejects_producer_listed_twice() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        QuorumVoted("a" * 64, "m", 0, 1, "float32", 10, (1, 1), (PEERS[0], PEERS[0]), ("b" * 64,) * 2, (0, 0))


def test_decision_rejects_producer_on_both_sides() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        QuorumDecided("a" * 64, "m", 0, 1, "agreed", 2, 1, (3,), ("c" * 64,), (PEERS[0],), (PEERS[0],))


def test_decision_agreed_needs_winner_digest() -> None:
    with pytest.raises(ValueError, match="needs a winner digest"):
        QuorumDecided("a" * 64, "m", 0, 1, "agreed", 2, 1, (3,), ("",), (PEERS[0],), ())


def test_penalty_rejects_bad_reason_code() -> None:
    with pytest.raises(ValueError, match="snake_case"):
        PeerPenalized(PEERS[0], "Bad Frame", ())


def test_penalty_rejects_author_penalizing_itself() -> None:
    with pytest.raises(SchemaViolation, match="cannot penalize itself"):
        sign_event(IDENTITY, PeerPenalized(IDENTITY.peer_id, "bad_frame", ()), seq=1, lamport=1, time_ms=0)


@pytest.mark.parametrize("block", ["block[1:3]", "block[0:0]", "expert[0][1]", "block[0:3"])
def test_vote_rejects_block_not_matching_layer(block: str) -> None:
    with pytest.raises(ValueError, match="block"):
        QuorumVoted(
            request_id="a" * 64, model_id="m", step=0, layer=0, dtype="float32", tolerance_nano=1,
            experts=(0,), producers=(PEERS[0],), digests=("b" * 64,), distances_nano=(0,), block=block,
        )
