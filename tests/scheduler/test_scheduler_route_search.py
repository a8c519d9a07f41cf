"""Route search against brute force: the chosen chain is the best of all chains, in any event order."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_swarm import GEOMETRY, MODEL, NOW_MS, peer_events

from cortex.registry import RegistryReducer, RegistryView
from cortex.scheduler import BlockRangeUncovered, PeerObservations, PlanningContext, plan_route
from cortex.scheduler.view import SchedulerView
from events import Event, Identity

PEERS = sorted((Identity.generate() for _ in range(4)), key=lambda identity: identity.peer_id)
BLOCKS = [f"block[{start}:{stop}]" for start in range(4) for stop in range(start + 1, 5)]


def _fold(events: list[Event]) -> RegistryView:
    reducer = RegistryReducer()
    view = reducer.empty()
    for event in events:
        view = reducer.apply(view, event)
    return view


def _all_chains(holdings: dict[int, list[str]]) -> list[list[tuple[int, int, int]]]:
    """Every chain of (start, stop, peer index) from layer 0 to layer 4."""
    edges = [
        (int(fragment[6:].split(":")[0]), int(fragment.split(":")[1][:-1]), index)
        for index, fragments in holdings.items()
        for fragment in set(fragments)
    ]
    chains = []
    for length in range(1, 5):
        for chain in itertools.product(edges, repeat=length):
            if chain[0][0] == 0 and chain[-1][1] == 4 and all(a[1] == b[0] for a, b in itertools.pairwise(chain)):
                chains.append(list(chain))
    return chains


@settings(max_examples=60, deadline=None)
@given(
    holdings=st.dictionaries(st.integers(0, 3), st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3), min_size=1),
    latencies=st.lists(st.integers(0, 40), min_size=4, max_size=4),
    data=st.data(),
)
def test_route_is_best_chain(holdings: dict[int, list[str]], latencies: list[int], data: st.DataObject) -> None:
    events = [event for index, fragments in holdings.items() for event in peer_events(PEERS[index], fragments)]
    observations = PeerObservations(latency_ms={peer.peer_id: float(ms) for peer, ms in zip(PEERS, latencies, strict=True)})
    contexts = [
        PlanningContext(_fold(order), SchedulerView(), NOW_MS, observations)
        for order in (events, data.draw(st.permutations(events)))
    ]
    chains = _all_chains(holdings)

    if not chains:
        for context in contexts:
            try:
                plan_route(context, MODEL, GEOMETRY, prompt_tokens=1, max_tokens=1)
            except BlockRangeUncovered:
                continue
            raise AssertionError("a route was planned although no chain covers layers 0 to 3")
        return

    def key(chain: list[tuple[int, int, int]]) -> tuple[float, int, tuple[tuple[int, str], ...]]:
        return (
            sum(float(latencies[index]) for _, _, index in chain),
            len(chain),
            tuple((start, PEERS[index].peer_id) for start, _, index in chain),
        )

    best = min(chains, key=key)
    expected = {f"block[{start}:{stop}]": PEERS[index].peer_id for start, stop, index in best}
    for context in contexts:
        assert plan_route(context, MODEL, GEOMETRY, prompt_tokens=1, max_tokens=1).route == expected
