"""TokenRouter with quorum settings and an in-process directory: votes, retries, failures, hedges."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from cortex.driver.errors import CallFailed, NoLiveHolder
from cortex.driver.router import TokenRouter
from cortex.quorum import PeerPenalized, QuorumDecided, QuorumVoted
from cortex.quorum.policy import QuorumPolicy, StragglerPolicy
from cortex.quorum.replicated import QuorumFailed, QuorumSettings
from cortex.runtime.fragments import MoeCall
from cortex.runtime.routing import RoutingDecision
from events import Event, Identity, sign_event

VOTER = Identity.generate()
REPLICAS = {name: Identity.generate().peer_id for name in ("a", "b", "c", "d")}
REQUEST = "cd" * 32
HIDDEN = 16  # D


class _Directory:
    """Replicas that double their rows, except `wrong` ones (x1.10) and `dead` ones (fail)."""

    call_timeout_s = 5.0

    def __init__(self, names: list[str], wrong: frozenset[str] = frozenset(), dead: frozenset[str] = frozenset(), slow: dict[str, float] | None = None) -> None:
        self.peers = [REPLICAS[name] for name in names]
        self.wrong = {REPLICAS[name] for name in wrong}
        self.dead = {REPLICAS[name] for name in dead}
        self.slow = {REPLICAS[name]: delay for name, delay in (slow or {}).items()}
        self.calls: list[str] = []

    def replicas(self, layer: int, expert: int) -> list[str]:
        return list(self.peers)

    def note_failure(self, peer: str) -> None:
        pass

    async def call_experts(self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]:
        self.calls.append(peer)
        await asyncio.sleep(self.slow.get(peer, 0.0))
        if peer in self.dead:
            raise CallFailed(peer, "expert", "connection refused")
        factor = 2.2 if peer in self.wrong else 2.0
        return [rows * factor for _, _, rows in segments]


class _Emitter:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, body: Any, refs: tuple[str, ...] = ()) -> Event:
        event = sign_event(VOTER, body, seq=len(self.events) + 1, lamport=len(self.events) + 1, time_ms=0, refs=refs)
        self.events.append(event)
        return event

    def bodies(self, kind: type) -> list[Any]:
        return [event.body for event in self.events if isinstance(event.body, kind)]


def _call(tokens: int = 3) -> MoeCall:
    hidden = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))  # [T, D]
    expert_ids = torch.tensor([[0, 1], [1, 2], [2, 0]])[:tokens]  # [T, K]
    return MoeCall(1, hidden, RoutingDecision(expert_ids, torch.full((tokens, 2), 0.5)))


def _router(directory: _Directory, emitter: _Emitter, redundancy: int, spot_check_ppm: int = 0, probe_ppm: int = 0) -> TokenRouter:
    settings = QuorumSettings(
        emit=emitter, model_id="m", own_peer=VOTER.peer_id, policy=QuorumPolicy(spot_check_ppm=spot_check_ppm, probe_ppm=probe_ppm),
        redundancy_of=lambda request_id: redundancy,
    )
    return TokenRouter(directory, settings)


async def _dispatch(router: TokenRouter, call: MoeCall) -> torch.Tensor:
    outputs = await router.dispatch(REQUEST, call, step=0)  # [T, K, D]
    assert router.quorum is not None
    await router.quorum.publisher.idle()
    return outputs


async def test_redundancy_outvotes_wrong_replica() -> None:
    emitter = _Emitter()
    call = _call()
    outputs = await _dispatch(_router(_Directory(["a", "b", "c"], wrong=frozenset({"c"})), emitter, redundancy=3), call)

    assert outputs.shape == (3, 2, HIDDEN)
    assert torch.equal(outputs[0, 0], call.hidden[0] * 2.0)
    (decision,) = emitter.bodies(QuorumDecided)
    assert decision.outcome == "agreed"
    assert decision.dissenting == (REPLICAS["c"],)
    assert set(decision.agreeing) == {REPLICAS["a"], REPLICAS["b"]}
    (vote,) = emitter.bodies(QuorumVoted)
    assert len(vote.producers) == 9  # 3 experts x 3 replicas
    (penalty,) = emitter.bodies(PeerPenalized)
    assert penalty.peer == REPLICAS["c"]
    assert penalty.evidence == (emitter.events[0].id, emitter.events[1].id)


async def test_disagreement_asks_one_more_replica() -> None:
    emitter = _Emitter()
    directory = _Directory(["a", "c", "b"], wrong=frozenset({"c"}))
    outputs = await _dispatch(_router(directory, emitter, redundancy=2), _call())

    (decision,) = emitter.bodies(QuorumDecided)
    assert decision.rounds == 2
    assert decision.quorum == 2
    assert decision.dissenting == (REPLICAS["c"],)
    assert directory.calls.count(REPLICAS["b"]) == 1
    assert outputs.shape == (3, 2, HIDDEN)


async def test_no_quorum_fails_with_reason() -> None:
    emitter = _Emitter()
    router = _router(_Directory(["a", "c"], wrong=frozenset({"c"})), emitter, redundancy=2)
    with pytest.raises(QuorumFailed, match="no quorum for expert"):
        await _dispatch(router, _call())
    assert router.quorum is not None
    await router.quorum.publisher.idle()

    (decision,) = emitter.bodies(QuorumDecided)
    assert decision.outcome == "no_quorum"


async def test_too_few_replicas_fails_with_reason() -> None:
    with pytest.raises(QuorumFailed, match="redundancy 2 needs at least 2"):
        await _dispatch(_router(_Directory(["a"]), _Emitter(), redundancy=2), _call())


async def test_failed_replica_is_replaced() -> None:
    emitter = _Emitter()
    await _dispatch(_router(_Directory(["a", "d", "b"], dead=frozenset({"d"})), emitter, redundancy=2), _call())

    (decision,) = emitter.bodies(QuorumDecided)
    assert set(decision.agreeing) == {REPLICAS["a"], REPLICAS["b"]}
    assert decision.dissenting == ()


async def test_spot_check_with_one_replica_is_skipped() -> None:
    emitter = _Emitter()
    router = _router(_Directory(["a"]), emitter, redundancy=1, spot_check_ppm=1_000_000)
    await _dispatch(router, _call())

    assert emitter.events == []
    assert router.stats.quorum.spot_checks_skipped == 3


async def test_spot_check_records_probability_and_seed() -> None:
    emitter = _Emitter()
    router = _router(_Directory(["a", "b"]), emitter, redundancy=1, spot_check_ppm=1_000_000)
    await _dispatch(router, _call())

    (vote,) = emitter.bodies(QuorumVoted)
    assert vote.spot_check_ppm == 1_000_000
    assert vote.spot_check_seed == 0
    assert emitter.bodies(QuorumDecided)[0].spot_check is True


async def test_lying_voter_inverts_its_decision() -> None:
    emitter = _Emitter()
    router = _router(_Directory(["a", "b", "c"]), emitter, redundancy=3)
    assert router.quorum is not None
    router.quorum.lying = True
    await _dispatch(router, _call())

    (decision,) = emitter.bodies(QuorumDecided)
    assert decision.agreeing == ()
    assert set(decision.dissenting) == {REPLICAS["a"], REPLICAS["b"], REPLICAS["c"]}


async def test_slow_replica_is_hedged() -> None:
    directory = _Directory(["a", "b"], slow={"a": 5.0})
    router = TokenRouter(directory, stragglers=StragglerPolicy(hedge_min_s=0.01, hedge_max_s=0.05))
    call = _call()
    outputs = await router.dispatch(REQUEST, call, step=0)

    assert torch.equal(outputs[0, 0], call.hidden[0] * 2.0)
    assert router.stats.hedges == 1
    assert router.stats.hedges_won == 1
    assert directory.calls == [REPLICAS["a"], REPLICAS["b"]]


async def test_deadline_moves_call_to_next_replica() -> None:
    directory = _Directory(["a", "b"], slow={"a": 5.0})
    directory.call_timeout_s = 0.05
    policy = StragglerPolicy(hedge_min_s=10.0, hedge_max_s=10.0, deadline_min_s=0.01)
    router = TokenRouter(directory, stragglers=policy)
    await router.dispatch(REQUEST, _call(), step=0)

    assert router.stats.deadlines_missed == 1
    assert router.stats.retries == 1


async def test_sole_replica_gets_the_call_timeout_not_the_deadline() -> None:
    directory = _Directory(["a"], slow={"a": 0.3})
    directory.call_timeout_s = 5.0
    policy = StragglerPolicy(hedge_min_s=10.0, hedge_max_s=10.0, deadline_min_s=0.01, deadline_factor=0.0)
    router = TokenRouter(directory, stragglers=policy)
    call = _call()
    outputs = await router.dispatch(REQUEST, call, step=0)

    assert torch.equal(outputs[0, 0], call.hidden[0] * 2.0)
    assert router.stats.deadlines_missed == 0
    assert directory.calls == [REPLICAS["a"]]


async def test_sole_replica_still_fails_at_the_call_timeout() -> None:
    directory = _Directory(["a"], slow={"a": 5.0})
    directory.call_timeout_s = 0.1
    policy = StragglerPolicy(hedge_min_s=10.0, hedge_max_s=10.0, deadline_min_s=0.01, deadline_factor=0.0)
    router = TokenRouter(directory, stragglers=policy)

    with pytest.raises(NoLiveHolder, match="no live replica left"):
        await router.dispatch(REQUEST, _call(), step=0)
    assert router.stats.deadlines_missed >= 1


async def test_replicated_slow_replica_is_hedged() -> None:
    emitter = _Emitter()
    directory = _Directory(["a", "b", "c"], slow={"a": 30.0})
    router = _router(directory, emitter, redundancy=2)
    router.stragglers = StragglerPolicy(hedge_min_s=0.01, hedge_max_s=0.05)
    await asyncio.wait_for(_dispatch(router, _call()), 10.0)

    (decision,) = emitter.bodies(QuorumDecided)
    assert set(decision.agreeing) == {REPLICAS["b"], REPLICAS["c"]}
    assert router.stats.quorum.hedges == 1
    assert directory.calls == [REPLICAS["a"], REPLICAS["b"], REPLICAS["c"]]


class _ExcludingDirectory(_Directory):
    """A directory whose `excluded` peers hold every expert but are left out of the ranking."""

    def __init__(self, names: list[str], excluded: list[str], wrong: frozenset[str] = frozenset()) -> None:
        super().__init__(names, wrong=wrong)
        self.excluded = [REPLICAS[name] for name in excluded]

    def excluded_replicas(self, layer: int, expert: int) -> list[str]:
        return list(self.excluded)


async def test_probe_of_honest_excluded_peer_agrees() -> None:
    emitter = _Emitter()
    router = _router(_ExcludingDirectory(["a", "b"], excluded=["d"]), emitter, redundancy=2, probe_ppm=1_000_000)
    call = _call()
    outputs = await _dispatch(router, call)

    assert torch.equal(outputs[0, 0], call.hidden[0] * 2.0)
    (decision,) = emitter.bodies(QuorumDecided)
    assert REPLICAS["d"] in decision.agreeing
    assert decision.dissenting == ()
    (vote,) = emitter.bodies(QuorumVoted)
    assert vote.producers.count(REPLICAS["d"]) == 1
    assert router.stats.quorum.probes == 1


async def test_probe_of_wrong_excluded_peer_dissents() -> None:
    emitter = _Emitter()
    directory = _ExcludingDirectory(["a", "b"], excluded=["c"], wrong=frozenset({"c"}))
    router = _router(directory, emitter, redundancy=2, probe_ppm=1_000_000)
    call = _call()
    outputs = await _dispatch(router, call)

    assert torch.equal(outputs[1, 0], call.hidden[1] * 2.0)
    (decision,) = emitter.bodies(QuorumDecided)
    assert decision.dissenting == (REPLICAS["c"],)
    assert set(decision.agreeing) == {REPLICAS["a"], REPLICAS["b"]}
