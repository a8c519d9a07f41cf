"""ReplicatedStage in one process: block holders with a KV cache per session, compared step by step.

Each fake holder's output depends on every input the session gave it before, like a KV
cache, so a holder that joined without a full replay would return a different output.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from cortex.driver.errors import CallFailed
from cortex.driver.loop import Stage
from cortex.quorum import DISAGREED, QuorumDecided, QuorumVoted
from cortex.quorum.blocks import BlockQuorum, ReplicatedStage, replicated_stage
from cortex.quorum.policy import QuorumPolicy
from cortex.quorum.replicated import QuorumFailed, QuorumSettings
from events import Event, Identity, sign_event

SPEC = "block[0:2]"
SESSION = "ab" * 32
DRIVER = Identity.generate()
PEERS = sorted(Identity.generate().peer_id for _ in range(5))


class FakeHolder:
    """A block holder whose output is (input + mean of the session's earlier inputs) * factor."""

    def __init__(self, peer: str, factor: float = 1.0, fails: bool = False) -> None:
        self.peer = peer
        self.spec = SPEC
        self.factor = factor
        self.fails = fails
        self.sessions: dict[str, list[torch.Tensor]] = {}
        self.positions: list[int] = []

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self.fails:
            raise CallFailed(self.peer, "stage", "connection refused")
        self.positions.append(position)
        earlier = self.sessions.setdefault(session_id, [])
        context = torch.cat(earlier).mean(0) if earlier else torch.zeros(hidden.shape[1])
        earlier.append(hidden)
        return (hidden + context) * self.factor

    async def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


class Swarm:
    """Fake holders, the trusted list the directory would return, and the events the driver published."""

    def __init__(self, holders: list[FakeHolder], replicas: int) -> None:
        self.holders = {holder.peer: holder for holder in holders}
        self.trusted = [holder.peer for holder in holders]
        self.events: list[Event] = []
        self.seqs = itertools.count(1)
        settings = QuorumSettings(emit=self.emit, model_id="m", own_peer=DRIVER.peer_id, policy=QuorumPolicy(), redundancy_of=lambda request: 1)
        self.quorum = BlockQuorum(lambda: list(self.trusted), self.holders.__getitem__, settings, replicas)

    async def emit(self, body: Any, refs: tuple[str, ...] = ()) -> Event:
        seq = next(self.seqs)
        event = sign_event(DRIVER, body, seq=seq, lamport=seq, time_ms=1_000, refs=refs)
        self.events.append(event)
        return event

    def bodies(self, kind: type) -> list[Any]:
        return [event.body for event in self.events if isinstance(event.body, kind)]


async def run_steps(stage: Stage, steps: int) -> list[torch.Tensor]:
    """Run a prefill of 3 tokens and `steps - 1` decode steps; return the outputs [T, D]."""
    outputs = [await stage.run(SESSION, torch.arange(12, dtype=torch.float32).reshape(3, 4), 0)]
    for step in range(1, steps):
        outputs.append(await stage.run(SESSION, torch.full((1, 4), float(step)), 2 + step))
    return outputs


async def honest_outputs(steps: int) -> list[torch.Tensor]:
    return await run_steps(Stage(FakeHolder(PEERS[4])), steps)


async def test_block_stage_outvotes_faulty_holder() -> None:
    swarm = Swarm([FakeHolder(PEERS[0]), FakeHolder(PEERS[1], factor=1.1), FakeHolder(PEERS[2])], replicas=3)
    stage = ReplicatedStage(SPEC, PEERS[0], swarm.quorum)

    outputs = await run_steps(stage, 3)
    await swarm.quorum.settings.publisher.idle()

    for output, expected in zip(outputs, await honest_outputs(3), strict=True):
        assert torch.equal(output, expected)
    decisions = swarm.bodies(QuorumDecided)
    assert len(decisions) == 3
    assert all(decision.block == SPEC and decision.layer == 0 for decision in decisions)
    assert all(decision.dissenting == (PEERS[1],) for decision in decisions)
    assert all(vote.block == SPEC for vote in swarm.bodies(QuorumVoted))
    penalties = [event.body for event in swarm.events if type(event.body).__name__ == "PeerPenalized"]
    assert [(penalty.peer, penalty.reason) for penalty in penalties] == [(PEERS[1], DISAGREED)] * 3
    assert swarm.quorum.stats.block_decisions == 3
    assert swarm.quorum.stats.block_dissents == 3


async def test_block_stage_replays_to_replacement() -> None:
    faulty = FakeHolder(PEERS[1], factor=1.1)
    spare = FakeHolder(PEERS[3])
    swarm = Swarm([FakeHolder(PEERS[0]), faulty, FakeHolder(PEERS[2]), spare], replicas=3)
    stage = ReplicatedStage(SPEC, PEERS[0], swarm.quorum)

    first = await run_steps(stage, 2)
    swarm.trusted.remove(PEERS[1])  # the trust view excluded the faulty holder
    later = await stage.run(SESSION, torch.full((1, 4), 5.0), 4)
    await swarm.quorum.settings.publisher.idle()

    reference = Stage(FakeHolder(PEERS[4]))
    expected = await run_steps(reference, 2)
    expected_later = await reference.run(SESSION, torch.full((1, 4), 5.0), 4)
    assert torch.equal(first[1], expected[1])
    assert torch.equal(later, expected_later)
    assert set(stage.members) == {PEERS[0], PEERS[2], PEERS[3]}
    assert spare.positions == [0, 3, 4]  # the prefill and the decode step replayed, then the new step
    assert swarm.bodies(QuorumDecided)[-1].dissenting == ()


async def test_block_stage_adds_holder_on_split() -> None:
    third = FakeHolder(PEERS[2])
    swarm = Swarm([FakeHolder(PEERS[0]), FakeHolder(PEERS[1], factor=1.1), third], replicas=2)
    stage = ReplicatedStage(SPEC, PEERS[0], swarm.quorum)

    outputs = await run_steps(stage, 2)
    await swarm.quorum.settings.publisher.idle()

    for output, expected in zip(outputs, await honest_outputs(2), strict=True):
        assert torch.equal(output, expected)
    first_decision = swarm.bodies(QuorumDecided)[0]
    assert first_decision.rounds == 2
    assert first_decision.dissenting == (PEERS[1],)
    assert third.positions[0] == 0


async def test_block_stage_split_without_spare_fails() -> None:
    swarm = Swarm([FakeHolder(PEERS[0]), FakeHolder(PEERS[1], factor=1.1)], replicas=2)
    stage = ReplicatedStage(SPEC, PEERS[0], swarm.quorum)

    with pytest.raises(QuorumFailed, match="no quorum for block\\[0:2\\] at step 0"):
        await run_steps(stage, 1)
    await swarm.quorum.settings.publisher.idle()
    assert swarm.bodies(QuorumDecided)[0].outcome == "no_quorum"


async def test_block_stage_replaces_failed_holder() -> None:
    broken = FakeHolder(PEERS[1])
    swarm = Swarm([FakeHolder(PEERS[0]), broken, FakeHolder(PEERS[2])], replicas=2)
    stage = ReplicatedStage(SPEC, PEERS[0], swarm.quorum)
    await run_steps(stage, 1)
    broken.fails = True

    output = await stage.run(SESSION, torch.full((1, 4), 1.0), 3)

    assert torch.equal(output, (await honest_outputs(2))[1])
    assert set(stage.members) == {PEERS[0], PEERS[2]}
    assert PEERS[1] in stage.failed


async def test_block_stage_plain_for_one_replica_or_holder() -> None:
    plain = Stage(FakeHolder(PEERS[0]))
    one_replica = Swarm([FakeHolder(PEERS[0]), FakeHolder(PEERS[1])], replicas=1)
    one_holder = Swarm([FakeHolder(PEERS[0])], replicas=3)

    assert replicated_stage(plain, PEERS[0], one_replica.quorum) is plain
    assert replicated_stage(plain, PEERS[0], one_holder.quorum) is plain
    assert isinstance(replicated_stage(plain, PEERS[0], Swarm([FakeHolder(PEERS[0]), FakeHolder(PEERS[1])], replicas=2).quorum), ReplicatedStage)


async def test_block_stage_goes_on_with_last_holder() -> None:
    swarm = Swarm([FakeHolder(PEERS[0]), FakeHolder(PEERS[1], factor=1.1), FakeHolder(PEERS[2])], replicas=3)
    stage = ReplicatedStage(SPEC, PEERS[0], swarm.quorum)
    await run_steps(stage, 1)
    swarm.trusted[:] = [PEERS[0]]  # the others were excluded or went away

    output = await stage.run(SESSION, torch.full((1, 4), 1.0), 3)

    assert torch.equal(output, (await honest_outputs(2))[1])
    assert set(stage.members) == {PEERS[0]}
    assert stage.unchecked_steps == 1
    assert swarm.quorum.stats.block_unchecked == 1
