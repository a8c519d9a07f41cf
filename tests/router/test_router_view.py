"""Router view: expert replicas per layer, liveness at a passed `now`, load and latency, delivery order."""

from __future__ import annotations

import secrets
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.comm.records import ExpertInputSent, ExpertOutputProduced, StageInputSent
from cortex.privacy import seal
from cortex.registry import LIVENESS_TIMEOUT_MS
from cortex.router import RouterReducer, RouterView
from cortex.scheduler import RequestCompleted, RequestSubmitted, request_id_for
from events import Event, Identity, PeerHeartbeat, PeerJoined, PeerLeft, ShardClaimed, ShardLoaded, ShardReleased, sign_event

MODEL = "cd" * 32
DIGEST = "ee" * 32
DRIVER, REPLICA_A, REPLICA_B = (Identity.generate() for _ in range(3))
START_MS = 1_000_000


class Signer:
    """Signs events of one identity with rising seq; Lamport clocks come from the caller."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.seq = 0

    def __call__(self, body: Any, lamport: int, time_ms: int, refs: tuple[str, ...] = ()) -> Event:
        self.seq += 1
        return sign_event(self.identity, body, seq=self.seq, lamport=lamport, time_ms=time_ms, refs=refs)


def joined(identity: Identity) -> PeerJoined:
    return PeerJoined((), "tcp://127.0.0.1:5000", identity.curve_public_key.decode(), {}, "1.0", "0.1.0")


def expert_input(layer: int, expert: int, rows: int) -> ExpertInputSent:
    return ExpertInputSent(MODEL, 0, layer, expert, f"e{layer}_{expert}", "float32", (rows, 8), DIGEST, rows * 32)


def expert_output(layer: int, expert: int, rows: int) -> ExpertOutputProduced:
    return ExpertOutputProduced(MODEL, 0, layer, expert, f"e{layer}_{expert}", "float32", (rows, 8), DIGEST, rows * 32)


def build_history() -> tuple[list[Event], str, str]:
    """A driver and two replicas: joins, expert loads, two requests with one multi-expert call each.

    Returns the events, the id of the request that completes and of the one still open.
    """
    driver, a, b = Signer(DRIVER), Signer(REPLICA_A), Signer(REPLICA_B)
    events = [driver(joined(DRIVER), 1, START_MS), a(joined(REPLICA_A), 1, START_MS), b(joined(REPLICA_B), 1, START_MS)]
    events += [a(ShardLoaded(MODEL, "expert[1][0]", 10), 2, START_MS + 10), a(ShardLoaded(MODEL, "expert[1][1]", 10), 3, START_MS + 10)]
    events += [b(ShardClaimed(MODEL, "expert[1][0]", 10), 2, START_MS + 10), b(ShardLoaded(MODEL, "expert[1][0]", 10), 3, START_MS + 20)]
    events += [b(ShardLoaded(MODEL, "expert[3][2]", 10), 4, START_MS + 20), b(ShardReleased(MODEL, "expert[3][2]"), 5, START_MS + 30)]
    events += [driver(ShardLoaded(MODEL, "head", 10), 2, START_MS + 10)]
    requests = []
    for index in range(2):
        nonce = secrets.token_hex(16)
        sealed = seal(b"a prompt", [DRIVER.peer_id])
        submitted = driver(RequestSubmitted(nonce, MODEL, 4, 8, sealed_prompt=sealed, redundancy=2 - index), 10 + index * 10, START_MS + 100)
        request_id = request_id_for(DRIVER.peer_id, nonce)
        requests.append(request_id)
        time_ms = START_MS + 200 + index * 100
        inputs = [driver(expert_input(1, expert, 3), 11 + index * 10, time_ms, (request_id,)) for expert in (0, 1)]
        stage = driver(StageInputSent(MODEL, 0, 0, 2, 0, "hidden", "float32", (3, 8), DIGEST, 96), 11 + index * 10, time_ms, (request_id,))
        ids = (request_id, *(event.id for event in inputs))
        replica = a if index == 0 else b
        outputs = [replica(expert_output(1, expert, 3), 12 + index * 10, time_ms + 40 + index * 20, ids) for expert in (0, 1)]
        events += [submitted, *inputs, stage, *outputs]
    events.append(driver(RequestCompleted(requests[0], 8, 4, "length", {"total": 5}, DIGEST, 4), 40, START_MS + 500))
    events += [a(PeerHeartbeat(a.seq), 41, START_MS + 600), b(PeerHeartbeat(b.seq), 41, START_MS + 400)]
    events.append(driver(PeerLeft("stopped"), 50, START_MS + 700))
    return events, requests[0], requests[1]


HISTORY, COMPLETED, OPEN = build_history()


def fold(events: list[Event], equivocations: dict[str, int] | None = None) -> RouterView:
    reducer = RouterReducer()
    view = reducer.empty()
    for author, seq in (equivocations or {}).items():
        view = reducer.apply_equivocation(view, author, seq)
    for event in events:
        view = reducer.apply(view, event)
    return view


def test_replicas_ranked_by_load_then_latency() -> None:
    view = fold(HISTORY)
    now = START_MS + 1_000
    # A served the completed request (0 open, 40 ms); B still serves the open one (1 open).
    assert view.replicas(MODEL, 1, 0, now) == [REPLICA_A.peer_id, REPLICA_B.peer_id]
    assert view.replicas(MODEL, 1, 1, now) == [REPLICA_A.peer_id]
    assert view.routing_table(MODEL, now) == {1: {0: (REPLICA_A.peer_id, REPLICA_B.peer_id), 1: (REPLICA_A.peer_id,)}}
    assert view.experts_of(REPLICA_B.peer_id) == [(MODEL, 1, 0)]
    assert view.models() == [MODEL]
    assert view.redundancy_of(COMPLETED) == 2
    assert view.redundancy_of(OPEN) == 1
    assert view.redundancy_of("ff" * 32) == 1


def test_load_and_latency_per_replica() -> None:
    view = fold(HISTORY)
    assert view.load_of(REPLICA_A.peer_id) == {
        "experts_loaded": 2, "expert_outputs": 2, "expert_rows": 6, "open_expert_requests": 0, "expert_latency_ms": 40.0,
    }
    assert view.load_of(REPLICA_B.peer_id) == {
        "experts_loaded": 1, "expert_outputs": 2, "expert_rows": 6, "open_expert_requests": 1, "expert_latency_ms": 60.0,
    }
    assert view.load_of(DRIVER.peer_id)["expert_outputs"] == 0
    assert view.inputs == {}, "every input met its output, so none is kept"
    unanswered = fold([event for event in HISTORY if event.type != "ExpertOutputProduced"])
    assert len(unanswered.inputs) == 4
    assert view.load_of(DRIVER.peer_id)["expert_latency_ms"] is None


def test_liveness_is_a_query_on_now() -> None:
    view = fold(HISTORY)
    assert view.is_live(REPLICA_A.peer_id, START_MS + 600 + LIVENESS_TIMEOUT_MS)
    assert not view.is_live(REPLICA_A.peer_id, START_MS + 601 + LIVENESS_TIMEOUT_MS)
    # B's last heartbeat is older, so at this time only A serves expert[1][0].
    assert view.replicas(MODEL, 1, 0, START_MS + 500 + LIVENESS_TIMEOUT_MS) == [REPLICA_A.peer_id]
    assert not view.is_live(DRIVER.peer_id, START_MS + 700), "a peer that left is not live"
    assert view.replicas(MODEL, 1, 0, START_MS + 10 * LIVENESS_TIMEOUT_MS) == []


def test_replicas_skip_equivocating_peer() -> None:
    view = fold(HISTORY, {REPLICA_A.peer_id: 3})
    assert view.replicas(MODEL, 1, 0, START_MS + 1_000) == [REPLICA_B.peer_id]
    assert view.replicas(MODEL, 1, 1, START_MS + 1_000) == []


def test_digest_follows_request_end() -> None:
    whole = fold(HISTORY)
    without_completion = fold([event for event in HISTORY if event.type != "RequestCompleted"])
    assert whole.digest() != without_completion.digest()
    assert without_completion.load_of(REPLICA_A.peer_id)["open_expert_requests"] == 1


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(range(len(HISTORY))), equivocate=st.booleans())
def test_view_same_in_every_order(order: list[int], equivocate: bool) -> None:
    equivocations = {REPLICA_B.peer_id: 4} if equivocate else None
    expected = fold(HISTORY, equivocations)
    shuffled = fold([HISTORY[index] for index in order], equivocations)
    assert shuffled.digest() == expected.digest()
    now = START_MS + 650
    assert shuffled.routing_table(MODEL, now) == expected.routing_table(MODEL, now)
    assert [shuffled.load_of(peer.peer_id) for peer in (REPLICA_A, REPLICA_B)] == [
        expected.load_of(peer.peer_id) for peer in (REPLICA_A, REPLICA_B)
    ]


@settings(max_examples=40, deadline=None)
@given(subset=st.sets(st.integers(min_value=0, max_value=len(HISTORY) - 1)), seed=st.randoms(use_true_random=False))
def test_view_same_for_shuffled_subset(subset: set[int], seed: Any) -> None:
    chosen = sorted(subset)
    shuffled = list(chosen)
    seed.shuffle(shuffled)
    in_order = fold([HISTORY[index] for index in chosen])
    assert fold([HISTORY[index] for index in shuffled]).digest() == in_order.digest()
