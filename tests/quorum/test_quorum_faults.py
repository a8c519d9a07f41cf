"""Faulty replicas and a lying voter in a 3-replica swarm of real node processes.

Layout: node 0 and node 1 hold the head and every block and drive requests; node 1 is a
lying voter (fault `wrong_voter`). Nodes 2 and 3 are honest replicas of every expert, and
nodes 4 to 8 each hold a fifth of the experts with one fault mode, so every expert has
exactly three replicas: two honest and one faulty. Requests ask for redundancy 3, so each
block step also runs on both drivers (replicated block steps), and both route its experts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from quorum_swarm import DRIVER, EXPERTS, PROMPT, QuorumSwarm, ask, assert_reference_answer, split_experts, start, trust_view, wait_for_same_quorum_events

from cortex.node.client import RequestResult
from cortex.node.config import QuorumConfig
from cortex.quorum import TRUST_MAX
from cortex.quorum.events import AGREED, QuorumDecided, QuorumVoted
from cortex.quorum.rules import is_excluded
from cortex.quorum.trust import decision_is_valid, vote_is_consistent
from events import LogStore

pytestmark = pytest.mark.slow

HONEST_DRIVER, LIAR, HONEST_A, HONEST_B = 0, 1, 2, 3
FAULTS = ["scale=1.10", "noise=0.05", "nan", "other_expert", "zeros"]
FAULTY = list(range(4, 4 + len(FAULTS)))
HONEST = [HONEST_DRIVER, HONEST_A, HONEST_B]
MAX_TOKENS = 12
MAX_REQUESTS = 8
# Three dissents exclude a peer. Calls already in flight when the third decision folds, and
# rankings reused for up to 100 ms, may add a few more before a router stops calling it.
# Both drivers run each block step and vote on its experts, and each stops calling the peer
# once its own view excludes it, so the bound counts both.
DISSENTS_TO_EXCLUDE = 3
IN_FLIGHT_SLACK = 4
VOTERS = 2


@pytest.fixture(scope="module")
def swarm(quorum_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumSwarm]:
    layout = [DRIVER, DRIVER, list(EXPERTS), list(EXPERTS), *split_experts(len(FAULTS))]
    # No probes of excluded peers here, so every dissent counted comes from routing before exclusion.
    quorum = {HONEST_DRIVER: QuorumConfig(probe=0.0), LIAR: QuorumConfig(fault="wrong_voter", probe=0.0)}
    quorum.update({index: QuorumConfig(fault=fault) for index, fault in zip(FAULTY, FAULTS, strict=True)})
    swarm = start(tmp_path_factory.mktemp("quorum-faults"), quorum_checkpoint, layout, quorum)
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


@pytest.fixture(scope="module")
def results(swarm: QuorumSwarm, tmp_path_factory: pytest.TempPathFactory) -> list[RequestResult]:
    """Requests of redundancy 3 until both the honest driver and the liar drove at least one."""
    root = tmp_path_factory.mktemp("quorum-faults-client")
    done: list[RequestResult] = []
    drivers = {swarm.peer(HONEST_DRIVER), swarm.peer(LIAR)}
    while len(done) < MAX_REQUESTS and not drivers <= {result.driver for result in done}:
        done.append(asyncio.run(ask(swarm, root / f"client{len(done)}", PROMPT, MAX_TOKENS, redundancy=3)))
    return done


def test_answers_equal_reference(swarm: QuorumSwarm, results: list[RequestResult]) -> None:
    drivers = {result.driver for result in results}

    assert drivers == {swarm.peer(HONEST_DRIVER), swarm.peer(LIAR)}
    for result in results:
        assert_reference_answer(swarm, result, PROMPT, MAX_TOKENS)


def test_faulty_replicas_excluded(swarm: QuorumSwarm, results: list[RequestResult]) -> None:
    wait_for_same_quorum_events(swarm, HONEST)
    view = trust_view(swarm.nodes[HONEST_DRIVER].data_dir)

    for index, fault in zip(FAULTY, FAULTS, strict=True):
        record = view.peer(swarm.peer(index))
        assert view.is_excluded(swarm.peer(index)), f"{fault}: trust {record.trust}"
        assert DISSENTS_TO_EXCLUDE <= record.dissents <= VOTERS * (DISSENTS_TO_EXCLUDE + IN_FLIGHT_SLACK), f"{fault}: {record.dissents} dissents"
        assert record.agreements == 0, fault
    assert results


def test_honest_views_agree(swarm: QuorumSwarm, results: list[RequestResult]) -> None:
    events = wait_for_same_quorum_events(swarm, HONEST)
    views = [trust_view(swarm.nodes[index].data_dir) for index in HONEST]

    assert events
    assert len({view.digest() for view in views}) == 1
    assert sorted(views[0].excluded_peers()) == sorted(swarm.peer(index) for index in [LIAR, *FAULTY])
    assert views[0].counts()["decisions"] > 0


def test_lying_voter_excluded_honest_kept(swarm: QuorumSwarm, results: list[RequestResult]) -> None:
    # The liar publishes its votes in the background, so some may still be on their way after
    # its request completed: wait until the honest nodes hold every vote the liar's log holds.
    wait_for_same_quorum_events(swarm, [*HONEST, LIAR])
    view = trust_view(swarm.nodes[HONEST_A].data_dir)

    for index in (HONEST_A, HONEST_B):
        assert view.trust_of(swarm.peer(index)) == TRUST_MAX
        assert view.peer(swarm.peer(index)).dissents == 0
    liar = view.peer(swarm.peer(LIAR))
    assert is_excluded(liar.trust)
    assert liar.false_votes == 2
    # Every vote and decision of the liar folded after its second false one is ignored. How
    # many it published after that depends on timing (it may be none), so count them in the log.
    assert view.counts()["ignored"] == facts_after_false(swarm.nodes[HONEST_A].data_dir, swarm.peer(LIAR), 2)


def test_always_wrong_never_regains(swarm: QuorumSwarm, results: list[RequestResult], tmp_path: Path) -> None:
    wait_for_same_quorum_events(swarm, HONEST)
    before = trust_view(swarm.nodes[HONEST_DRIVER].data_dir)
    for attempt in range(2):
        result = asyncio.run(ask(swarm, tmp_path / f"again{attempt}", "Open the file", MAX_TOKENS, redundancy=3))
        assert_reference_answer(swarm, result, "Open the file", MAX_TOKENS)
    wait_for_same_quorum_events(swarm, HONEST)
    after = trust_view(swarm.nodes[HONEST_DRIVER].data_dir)

    for index in FAULTY:
        assert after.trust_of(swarm.peer(index)) <= before.trust_of(swarm.peer(index))
        assert after.is_excluded(swarm.peer(index))
        assert after.peer(swarm.peer(index)).agreements == 0


def facts_after_false(data_dir: Path, voter: str, false_facts: int) -> int:
    """Count `voter`'s votes and decisions that sort after its `false_facts`-th provably false one."""
    store = LogStore(data_dir / "events.db")
    try:
        events = [event for name in ("QuorumVoted", "QuorumDecided") for event in store.events(type=name, author=voter)]
    finally:
        store.close()
    events.sort(key=lambda event: (event.lamport, event.author, event.seq))
    seen_false = 0
    for index, event in enumerate(events):
        body = event.body
        if isinstance(body, QuorumVoted):
            false = not vote_is_consistent(body)
        else:
            assert isinstance(body, QuorumDecided)
            false = body.outcome == AGREED and not decision_is_valid(event.author, body.quorum, body.agreeing, body.dissenting)
        seen_false += false
        if seen_false == false_facts:
            return len(events) - index - 1
    return 0
