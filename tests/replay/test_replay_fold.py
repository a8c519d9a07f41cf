"""Replay rebuilds the live views: several nodes fed one history in different orders, then replayed.

Each simulated node is a real LogStore and Acceptor with a Projection for every available
view (the node's own reducers). The multi-process version, with node processes on a bus,
is in test_replay_multinode.py.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import MODEL, Author, Scenario, build_scenario, joined, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import Acceptor, Event, Identity, LogStore, PeerHeartbeat, Projection, ShardClaimed, ShardLoaded, sign_event
from replay.fold import Folder
from replay.reader import LogReader
from replay.synthetic import SwarmSimulator
from replay.views import available_views, view_digest


def history_with_equivocation(identities: list[Identity]) -> tuple[list[Event], str]:
    """Return the scenario plus a fourth author that equivocates at seq 2 and keeps writing."""
    scenario = build_scenario(identities[:3])
    clock = [scenario.events[-1].lamport]
    cheat = Author(identities[3], clock)
    events = list(scenario.events)
    events.append(cheat.sign(joined(cheat, 3)))
    events.append(cheat.sign(ShardLoaded(model_id=MODEL, fragment="block[4:8]", memory_bytes=10)))
    events.append(cheat.sign(ShardClaimed(model_id=MODEL, fragment="block[4:8]", memory_bytes=20), seq=2))
    events.append(cheat.sign(PeerHeartbeat(latest_seq=2)))
    events.append(cheat.sign(ShardLoaded(model_id=MODEL, fragment="block[8:12]", memory_bytes=30)))
    return events, cheat.peer_id


def live_node(path: Path, wires: list[bytes], batch_sizes: list[int]) -> dict[str, str]:
    """Feed wires to a real node in batches; return each view's live digest."""
    views = available_views()
    projections = {view.name: Projection(view.new_reducer()) for view in views}
    with LogStore(path) as store:
        acceptor = Acceptor(store, list(projections.values()))
        position = 0
        for size in batch_sizes:
            acceptor.accept_many(wires[position : position + size])
            position += size
        acceptor.accept_many(wires[position:])
    return {name: view_digest(projection.view) for name, projection in projections.items()}


def replayed(path: Path) -> dict[str, str]:
    with LogReader(path) as reader:
        folder = Folder(reader, available_views())
        folder.run()
        return {name: view_digest(view) for name, view in folder.views.items()}


@pytest.fixture(scope="module")
def four_identities() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), duplicates=st.integers(0, 5))
def test_replay_digests_equal_live_nodes(tmp_path_factory: pytest.TempPathFactory, four_identities: list[Identity],
                                         seed: int, duplicates: int) -> None:
    events, _cheat = history_with_equivocation(four_identities)
    shuffler = random.Random(seed)
    root = tmp_path_factory.mktemp("nodes")
    digests = []
    for node in range(3):
        wires = [event.wire for event in events] + [shuffler.choice(events).wire for _ in range(duplicates)]
        shuffler.shuffle(wires)
        batches = [shuffler.randint(1, 4) for _ in range(len(wires) // 2)]
        path = root / f"node{node}.db"
        live = live_node(path, wires, batches)
        assert replayed(path) == live, f"node {node}: replay differs from the live views"
        digests.append(live)
    assert digests[0] == digests[1] == digests[2], "nodes that accepted the same events must agree"


def test_replay_excludes_equivocator_after_disputed_seq(tmp_path: Path, four_identities: list[Identity]) -> None:
    events, cheat = history_with_equivocation(four_identities)
    live_node(tmp_path / "events.db", [event.wire for event in events], [])
    with LogReader(tmp_path) as reader:
        folder = Folder(reader, available_views())
        folder.run()
        assert folder.excluded == {cheat: 2}
        registry = folder.view("registry")
        assert registry.peers[cheat].equivocated_from_seq == 2
        assert registry.shards_of(cheat) == []


def test_until_index_equals_fold_of_prefix(tmp_path: Path, four_identities: list[Identity]) -> None:
    """The view at index i is what a node holding exactly events 0..i would have."""
    events, _cheat = history_with_equivocation(four_identities)
    live_node(tmp_path / "full.db", [event.wire for event in events], [])
    with LogReader(tmp_path / "full.db") as reader:
        ordered = list(reader.canonical())
        for index in range(len(ordered)):
            folder = Folder(reader, available_views())
            folder.run(index)
            assert folder.index == index
            prefix_path = tmp_path / f"prefix{index}.db"
            expected = live_node(prefix_path, [event.wire for event in ordered[: index + 1]], [])
            assert {name: view_digest(view) for name, view in folder.views.items()} == expected, f"index {index}"


def test_step_by_step_equals_run(tmp_path: Path, four_identities: list[Identity]) -> None:
    events, _cheat = history_with_equivocation(four_identities)
    live_node(tmp_path / "events.db", [event.wire for event in events], [])
    with LogReader(tmp_path) as reader:
        stepped = Folder(reader, available_views())
        steps = []
        while (step := stepped.step()) is not None:
            steps.append(step)
        whole = Folder(reader, available_views())
        whole.run()
        assert [view_digest(view) for view in stepped.views.values()] == [view_digest(view) for view in whole.views.values()]
        assert sum(step.refolded for step in steps) == 1
        assert [step.index for step in steps] == list(range(len(events)))


def test_replay_cli_until_forms(scenario_log: Path, scenario: Scenario) -> None:
    import orjson

    def until(value: str) -> dict[str, Any]:
        result = run_cli("replay", str(scenario_log), "--view", "registry", "--json", "--until", value)
        assert result.status == 0, result.stderr
        return orjson.loads(result.stdout)

    with LogReader(scenario_log) as reader:
        ordered = [event.id for event in reader.canonical()]
    by_index = until("4")
    assert by_index["index"] == 4
    assert by_index["events_applied"] == 5
    by_id = until(ordered[4][:10])
    assert by_id["views"]["registry"]["digest"] == by_index["views"]["registry"]["digest"]
    assert until("-1")["index"] == len(ordered) - 1
    at_time = until(f"@{scenario.events[4].time_ms}")
    assert at_time["events_applied"] == 5
    assert at_time["now_ms"] == scenario.events[4].time_ms
    assert at_time["views"]["registry"]["digest"] == by_index["views"]["registry"]["digest"]
    whole = run_cli("replay", str(scenario_log), "--json")
    assert orjson.loads(whole.stdout)["events_applied"] == len(ordered)


def test_replay_cli_errors(scenario_log: Path) -> None:
    outside = run_cli("replay", str(scenario_log), "--until", "999")
    assert outside.status == 2
    assert "outside the log" in outside.stderr
    unknown_view = run_cli("replay", str(scenario_log), "--view", "weather")
    assert unknown_view.status == 2
    assert "no view named 'weather'" in unknown_view.stderr
    bad_form = run_cli("replay", str(scenario_log), "explode")
    assert bad_form.status == 2
    assert "unknown replay form" in bad_form.stderr


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_replay_equals_live_with_requests(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """Request events fold through the Scheduler view too; one driver equivocates mid-stream."""
    pytest.importorskip("cortex.scheduler")
    simulator = SwarmSimulator(4, seed=7)
    events = list(itertools.islice(simulator.events(), 300))
    assert any(event.type == "TokenGenerated" for event in events)
    cheat = simulator.peers[0]
    target = [event for event in events if event.author == cheat.identity.peer_id][20]
    twin = sign_event(cheat.identity, PeerHeartbeat(latest_seq=target.seq - 1), seq=target.seq,
                      lamport=target.lamport, time_ms=target.time_ms)
    wires = [event.wire for event in events] + [twin.wire]
    shuffler = random.Random(seed)
    root = tmp_path_factory.mktemp("requests")
    digests = []
    for node in range(2):
        shuffler.shuffle(wires)
        path = root / f"node{node}.db"
        live = live_node(path, wires, [shuffler.randint(1, 30) for _ in range(20)])
        assert set(live) >= {"registry", "scheduler"}
        assert replayed(path) == live
        digests.append(live)
    assert digests[0] == digests[1]
    with LogReader(root / "node0.db") as reader:
        folder = Folder(reader, available_views())
        folder.run()
        assert folder.excluded == {cheat.identity.peer_id: target.seq}
        assert folder.view("scheduler").equivocated_from_seq == {cheat.identity.peer_id: target.seq}


def test_folder_passes_events_to_projecting_views() -> None:
    from replay.fold import projected_families
    from replay.views import load_view

    families = {name: projected_families(load_view(name).new_reducer()) for name in ("registry", "scheduler", "router", "quorum")}
    assert families["registry"] == {"membership", "shards"}
    assert families["scheduler"] == {"requests"}
    assert families["router"] == {"membership", "shards", "requests", "records"}
    assert families["quorum"] == {"quorum"}
    assert projected_families(object()) is None, "a reducer that names no families gets every event"


def test_replay_cli_until_headline(scenario_log: Path, scenario: Scenario) -> None:
    total = len(scenario.events)
    by_index = run_cli("replay", str(scenario_log), "--view", "registry", "--until", "4")
    assert by_index.status == 0, by_index.stderr
    assert "folded 5 of the first 5 events in canonical order (indexes 0 to 4);" in " ".join(by_index.stdout.split())

    at_time = run_cli("replay", str(scenario_log), "--view", "registry", "--until", f"@{scenario.events[4].time_ms}")
    assert at_time.status == 0, at_time.stderr
    headline = " ".join(at_time.stdout.split())
    assert f"folded 5 of the first {total} events in canonical order (indexes 0 to {total - 1})" in headline
    assert "at or before --until" in headline
