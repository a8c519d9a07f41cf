"""Planning: driver order, route choice by latency, load and trust, tie-breaks, re-planning, experts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_events_factory import DRIVER, SUBMITTER, acceptance, request_id_of, signed, submission
from scheduler_swarm import GEOMETRY, MODEL, NOW_MS, peer_events, registry_of

from cortex.registry import RegistryReducer
from cortex.scheduler import BlockRangeUncovered, InvalidRoute, NoLiveHeadHolder
from cortex.scheduler.observations import PeerObservations
from cortex.scheduler.planning import PlanningContext, choose_driver, driver_order, rank_expert_replicas, rank_replicas
from cortex.scheduler.routes import plan_route, replan_route
from cortex.scheduler.view import SchedulerView, fold
from events import Identity

PEERS = sorted((Identity.generate() for _ in range(8)), key=lambda identity: identity.peer_id)
A, B, C, D, E, F, G, H = PEERS
REQUEST_ID = "5a" * 32


def context(registry_holdings: dict[Identity, list[str]], **options: object) -> PlanningContext:
    scheduler = options.pop("scheduler", SchedulerView())
    left = options.pop("left", ())
    registry = registry_of(registry_holdings, left=left)  # type: ignore[arg-type]
    return PlanningContext(registry, scheduler, NOW_MS, **options)  # type: ignore[arg-type]


def plan(ctx: PlanningContext, prompt_tokens: int = 4, max_tokens: int = 4) -> dict[str, str]:
    return plan_route(ctx, MODEL, GEOMETRY, prompt_tokens=prompt_tokens, max_tokens=max_tokens).route


# Driver order


def test_driver_order_only_live_head_holders() -> None:
    registry = registry_of({A: ["head"], B: ["head", "block[0:4]"], C: ["block[0:4]"], D: ["head"]}, left=[D])

    order = driver_order(registry, MODEL, REQUEST_ID, NOW_MS)

    assert sorted(order) == sorted([A.peer_id, B.peer_id])
    assert driver_order(registry, MODEL, REQUEST_ID, NOW_MS) == order


def test_driver_submitter_first_if_head_holder() -> None:
    registry = registry_of({A: ["head"], B: ["head"], C: ["head"]})
    order = driver_order(registry, MODEL, REQUEST_ID, NOW_MS)

    last = order[-1]
    with_submitter = driver_order(registry, MODEL, REQUEST_ID, NOW_MS, submitter=last)

    assert with_submitter[0] == last
    assert with_submitter[1:] == order[:-1]
    assert driver_order(registry, MODEL, REQUEST_ID, NOW_MS, submitter=D.peer_id) == order


def test_driver_order_excludes_peers() -> None:
    registry = registry_of({A: ["head"], B: ["head"]})
    order = driver_order(registry, MODEL, REQUEST_ID, NOW_MS)

    assert driver_order(registry, MODEL, REQUEST_ID, NOW_MS, excluded=[order[0]]) == order[1:]


def test_takeover_when_driver_dies() -> None:
    holdings = {A: ["head"], B: ["head"], C: ["head"]}
    order = driver_order(registry_of(holdings), MODEL, REQUEST_ID, NOW_MS)
    first = next(identity for identity in PEERS if identity.peer_id == order[0])

    after = driver_order(registry_of(holdings, left=[first]), MODEL, REQUEST_ID, NOW_MS)

    assert after == order[1:]


@settings(max_examples=60, deadline=None)
@given(
    request_id=st.binary(min_size=32, max_size=32).map(bytes.hex),
    present=st.sets(st.sampled_from(range(8)), min_size=1),
    joining=st.sets(st.sampled_from(range(8))),
)
def test_takeover_order_stable_under_joins(request_id: str, present: set[int], joining: set[int]) -> None:
    reducer = RegistryReducer()
    registry = reducer.empty()
    for index in sorted(present):
        for event in peer_events(PEERS[index], ["head"]):
            registry = reducer.apply(registry, event)
    before = driver_order(registry, MODEL, request_id, NOW_MS)
    for index in sorted(joining - present):
        fragments = ["head"] if index % 2 else ["block[0:4]"]
        for event in peer_events(PEERS[index], fragments):
            registry = reducer.apply(registry, event)

    after = driver_order(registry, MODEL, request_id, NOW_MS)

    assert [peer for peer in after if peer in before] == before
    assert set(after) - set(before) == {PEERS[index].peer_id for index in joining - present if index % 2}


def test_choose_driver_without_head_holder() -> None:
    registry = registry_of({A: ["block[0:4]"]})

    with pytest.raises(NoLiveHeadHolder, match=f"head of model {MODEL}"):
        choose_driver(registry, MODEL, REQUEST_ID, NOW_MS)


# Route choice


def test_route_tie_breaks_by_peer_id() -> None:
    ctx = context({C: ["block[0:4]"], A: ["block[0:4]"], B: ["block[0:4]"]})

    assert plan(ctx) == {"block[0:4]": A.peer_id}


def test_route_deterministic_across_event_orders() -> None:
    holdings = {A: ["block[0:2]", "block[2:4]"], B: ["block[0:2]"], C: ["block[2:4]", "block[0:4]"]}
    forward = context(holdings)
    backward = context(dict(reversed(list(holdings.items()))))

    assert plan(forward) == plan(backward)
    assert forward.registry.digest() == backward.registry.digest()


def test_route_prefers_low_latency() -> None:
    observations = PeerObservations(latency_ms={A.peer_id: 50.0, B.peer_id: 2.0})

    ctx = context({A: ["block[0:4]"], B: ["block[0:4]"]}, observations=observations)

    assert plan(ctx) == {"block[0:4]": B.peer_id}


def test_route_prefers_own_node() -> None:
    observations = PeerObservations(local_peer=B.peer_id)

    ctx = context({A: ["block[0:4]"], B: ["block[0:4]"]}, observations=observations)

    assert plan(ctx) == {"block[0:4]": B.peer_id}


def test_route_fewer_hops_on_equal_cost() -> None:
    ctx = context({A: ["block[0:2]"], B: ["block[2:4]"], C: ["block[0:4]"]})

    assert plan(ctx) == {"block[0:4]": C.peer_id}


def test_route_splits_when_cheaper() -> None:
    observations = PeerObservations(latency_ms={A.peer_id: 1.0, B.peer_id: 1.0, C.peer_id: 30.0})

    ctx = context({A: ["block[0:2]"], B: ["block[2:4]"], C: ["block[0:4]"]}, observations=observations)

    assert plan(ctx) == {"block[0:2]": A.peer_id, "block[2:4]": B.peer_id}


def test_route_avoids_loaded_holder() -> None:
    submit = signed(SUBMITTER, submission(), seq=1)
    busy = signed(DRIVER, acceptance(request_id_of(submit), {"block[0:4]": A.peer_id}), seq=1, lamport=2)
    scheduler = fold([submit, busy])

    ctx = context({A: ["block[0:4]"], B: ["block[0:4]"]}, scheduler=scheduler)

    assert ctx.load(A.peer_id) == 1
    assert plan(ctx) == {"block[0:4]": B.peer_id}


def test_route_local_calls_count_as_load() -> None:
    observations = PeerObservations()
    observations.call_started(A.peer_id)

    ctx = context({A: ["block[0:4]"], B: ["block[0:4]"]}, observations=observations)

    assert plan(ctx) == {"block[0:4]": B.peer_id}


def test_route_trust_weighs_and_excludes() -> None:
    holdings = {A: ["block[0:4]"], B: ["block[0:4]"]}

    assert plan(context(holdings, trust={A.peer_id: 0.5})) == {"block[0:4]": B.peer_id}
    assert plan(context(holdings, trust={B.peer_id: 0.0})) == {"block[0:4]": A.peer_id}
    assert plan(context(holdings, trust={A.peer_id: 0.4, B.peer_id: 0.3}, min_trust=0.35)) == {"block[0:4]": A.peer_id}


def test_route_ignores_dead_holders() -> None:
    ctx = context({A: ["block[0:4]"], B: ["block[0:4]"]}, left=[A])

    assert plan(ctx) == {"block[0:4]": B.peer_id}


def test_uncovered_range_named() -> None:
    ctx = context({A: ["block[0:2]"], B: ["block[2:4]"]}, left=[B])

    with pytest.raises(BlockRangeUncovered) as raised:
        plan(ctx)

    message = str(raised.value)
    assert f"model {MODEL}" in message
    assert "layers 2 to 3" in message
    assert "block[2:4] has no live holder" in message
    assert raised.value.details["fragment"] == "block[2:4]"
    assert raised.value.code == "block_range_uncovered"


def test_uncovered_when_blocks_do_not_chain() -> None:
    ctx = context({A: ["block[0:2]"], B: ["block[1:4]"]})

    with pytest.raises(BlockRangeUncovered, match="block\\[1:4\\] is live but starts at layer 1"):
        plan(ctx)


def test_uncovered_when_nothing_announced() -> None:
    with pytest.raises(BlockRangeUncovered, match="no peer announced a block that contains layer 0"):
        plan(context({A: ["head"]}))


# Re-planning


def _record_with_route(route: dict[str, str]) -> tuple[SchedulerView, str]:
    submit = signed(SUBMITTER, submission(), seq=1)
    accept = signed(DRIVER, acceptance(request_id_of(submit), route), seq=1, lamport=2)
    return fold([submit, accept]), request_id_of(submit)


def test_replan_keeps_live_holders() -> None:
    scheduler, request_id = _record_with_route({"block[0:2]": A.peer_id, "block[2:4]": B.peer_id})
    holdings = {A: ["block[0:2]"], B: ["block[2:4]"], C: ["block[0:4]"], D: ["block[2:4]"]}
    observations = PeerObservations(latency_ms={A.peer_id: 40.0, C.peer_id: 1.0, D.peer_id: 5.0})
    ctx = context(holdings, scheduler=scheduler, observations=observations, own_request=request_id, left=[B])
    record = scheduler.record(request_id)
    assert record is not None

    replanned = replan_route(ctx, record, GEOMETRY, failed={B.peer_id})

    assert replanned.route == {"block[0:2]": A.peer_id, "block[2:4]": D.peer_id}
    assert replanned.changes_from(record.route) == {"block[2:4]": (B.peer_id, D.peer_id)}
    body = replanned.replanned(request_id, B.peer_id, "holder_failed", resume_step=3)
    assert body.route == replanned.route
    assert body.plan_digest == replanned.digest


def test_replan_reroutes_when_no_same_range() -> None:
    scheduler, request_id = _record_with_route({"block[0:2]": A.peer_id, "block[2:4]": B.peer_id})
    ctx = context({A: ["block[0:2]"], B: ["block[2:4]"], C: ["block[0:4]"]}, scheduler=scheduler, own_request=request_id)
    record = scheduler.record(request_id)
    assert record is not None

    assert replan_route(ctx, record, GEOMETRY, failed={B.peer_id}).route == {"block[0:4]": C.peer_id}


def test_replan_without_replacement_fails() -> None:
    scheduler, request_id = _record_with_route({"block[0:2]": A.peer_id, "block[2:4]": B.peer_id})
    ctx = context({A: ["block[0:2]"], B: ["block[2:4]"]}, scheduler=scheduler, own_request=request_id)
    record = scheduler.record(request_id)
    assert record is not None

    with pytest.raises(BlockRangeUncovered, match=f"failed or untrusted peers {B.peer_id}"):
        replan_route(ctx, record, GEOMETRY, failed={B.peer_id})


def test_replan_needs_own_request_context() -> None:
    scheduler, request_id = _record_with_route({"block[0:4]": A.peer_id})
    record = scheduler.record(request_id)
    assert record is not None

    with pytest.raises(InvalidRoute, match="own_request"):
        replan_route(context({A: ["block[0:4]"]}, scheduler=scheduler), record, GEOMETRY, failed={A.peer_id})


# Experts


def test_expert_replicas_ranked() -> None:
    observations = PeerObservations(latency_ms={A.peer_id: 9.0, B.peer_id: 3.0})
    holdings = {A: ["expert[1][0]", "expert[1][1]"], B: ["expert[1][0]"], C: ["expert[1][2]"], D: ["expert[1][0]"]}

    table = rank_expert_replicas(context(holdings, observations=observations, left=[C]), MODEL)

    assert table[(1, 0)] == (B.peer_id, A.peer_id, D.peer_id)
    assert table[(1, 1)] == (A.peer_id,)
    assert table[(1, 2)] == ()
    assert list(table) == [(1, 0), (1, 1), (1, 2)]


def test_rank_replicas_skips_untrusted() -> None:
    ctx = context({A: ["head"], B: ["head"], C: ["head"]}, trust={B.peer_id: 0.0})

    assert rank_replicas(ctx, [C.peer_id, B.peer_id, A.peer_id]) == [A.peer_id, C.peer_id]


def test_observations_smooth_latency() -> None:
    observations = PeerObservations()
    observations.record_round_trip(A.peer_id, 10.0)
    observations.record_round_trip(A.peer_id, 20.0)

    assert observations.expected_latency_ms(A.peer_id) == pytest.approx(12.0)
    assert observations.expected_latency_ms(B.peer_id) == 10.0
    observations.call_started(A.peer_id)
    observations.call_finished(A.peer_id)
    observations.call_finished(A.peer_id)
    assert observations.load(A.peer_id) == 0
    with pytest.raises(ValueError, match="negative"):
        observations.record_round_trip(A.peer_id, -1.0)
