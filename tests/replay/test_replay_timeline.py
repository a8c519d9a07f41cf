"""Request timelines: every event of a request in order, the gaps, who served what, where time went."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
from conftest import MODEL, Author, NodeLog, Scenario, run_cli

from cortex.scheduler import request_id_for
from events import Event, Identity, ShardLoaded
from replay.reader import EventFilter, LogReader
from replay.reports import part_label
from replay.synthetic import generate_log, quorum_types, submission
from replay.timeline import build_timeline

T0 = 1_764_900_000_000


def request_history(identities: list[Identity]) -> tuple[list[Event], Author, Author, Author]:
    scheduler = pytest.importorskip("cortex.scheduler")
    from cortex.privacy import seal

    clock = [0]
    submitter, driver, holder = (Author(identity, clock) for identity in identities[:3])
    body, request_id = submission(scheduler, submitter.peer_id, random.Random(0),
                                  model_id=MODEL, max_tokens=8, prompt_bytes=20, prompt_digest="e" * 64)
    submitted = submitter.sign(body, time_ms=T0)
    request_id = request_id or submitted.id
    refs = (submitted.id,)
    route = {"block[0:4]": driver.peer_id, "block[4:8]": holder.peer_id}
    reservations = {"block[0:4]": 1024, "block[4:8]": 2048}
    accepted = driver.sign(scheduler.RequestAccepted(
        request_id=request_id, route=route, kv_reservations=reservations, prompt_tokens=5,
        plan_digest=scheduler.plan_digest(route, reservations, 5)), refs=refs, time_ms=T0 + 50)
    sealed = seal(orjson.dumps({"token_ids": [1, 2, 3, 4], "text": "four"}), [submitter.peer_id, driver.peer_id])
    tokens = [
        driver.sign(scheduler.TokenGenerated(request_id=request_id, step_start=start, step_stop=start + 4,
                                             sealed_tokens=sealed), refs=refs, time_ms=T0 + when)
        for start, when in ((0, 300), (4, 400))
    ]
    record = holder.sign(ShardLoaded(model_id=MODEL, fragment="block[4:8]", memory_bytes=5), refs=(accepted.id,),
                         time_ms=T0 + 420)
    completed = driver.sign(scheduler.RequestCompleted(
        request_id=request_id, prompt_tokens=5, completion_tokens=8, finish_reason="length",
        timings_ms={"total": 450}, records_digest="f" * 64, records_count=0), refs=refs, time_ms=T0 + 450)
    unrelated = holder.sign(ShardLoaded(model_id=MODEL, fragment="head", memory_bytes=5), time_ms=T0 + 460)
    return [submitted, accepted, *tokens, record, completed, unrelated], submitter, driver, holder


@pytest.fixture
def request_log(tmp_path: Path, identities: list[Identity]) -> tuple[Path, list[Event], list[Author]]:
    events, submitter, driver, holder = request_history(identities)
    node = NodeLog(tmp_path / "events.db")
    node.accept([event.wire for event in reversed(events)])
    node.close()
    return tmp_path, events, [submitter, driver, holder]


def test_timeline_orders_events_with_gaps(request_log: tuple[Path, list[Event], list[Author]]) -> None:
    path, events, _authors = request_log
    with LogReader(path) as reader:
        timeline = build_timeline(reader, events[0].id)
    assert timeline.request_found
    assert [entry.event.id for entry in timeline.entries] == [event.id for event in events[:-1]]
    assert [entry.gap_ms for entry in timeline.entries] == [None, 50, 250, 100, 20, 30]
    assert [entry.depth for entry in timeline.entries] == [0, 1, 1, 1, 2, 1]
    assert timeline.duration_ms == 450
    assert timeline.time_by_type == {"TokenGenerated": 350, "RequestAccepted": 50, "RequestCompleted": 30, "ShardLoaded": 20}


def test_timeline_credits_route_and_fragments(request_log: tuple[Path, list[Event], list[Author]]) -> None:
    path, events, (_submitter, driver, holder) = request_log
    with LogReader(path) as reader:
        timeline = build_timeline(reader, events[0].id)
    assert {"type": "RequestAccepted", "route": "block[0:4]"} in timeline.served_by[driver.peer_id]
    holder_parts = timeline.served_by[holder.peer_id]
    assert {"type": "RequestAccepted", "route": "block[4:8]"} in holder_parts
    assert {"type": "ShardLoaded", "fragment": "block[4:8]"} in holder_parts
    token_entry = timeline.entries[2]
    assert token_entry.served == {}


def test_timeline_cli_forms(request_log: tuple[Path, list[Event], list[Author]]) -> None:
    path, events, _authors = request_log
    request = events[0].id
    as_json = run_cli("replay", str(path), "timeline", request[:12], "--json")
    assert as_json.status == 0, as_json.stderr
    data = orjson.loads(as_json.stdout)
    assert len(data["events"]) == 6
    assert data["events"][2]["body"]["step_start"] == 0
    flag = run_cli("replay", str(path), "--timeline", request, "--json")
    assert orjson.loads(flag.stdout) == data
    by_body_id = run_cli("replay", str(path), "timeline", events[1].body.request_id, "--json")
    assert [event["id"] for event in orjson.loads(by_body_id.stdout)["events"]] == [event["id"] for event in data["events"]]
    human = run_cli("replay", str(path), "timeline", request)
    assert human.status == 0
    assert "6 events over 450 ms" in human.stdout
    assert "where time went" in human.stdout
    assert "who served what" in human.stdout


def test_timeline_of_event_without_request_event(scenario_log: Path, scenario: Scenario) -> None:
    with LogReader(scenario_log) as reader:
        timeline = build_timeline(reader, "0" * 64)
    assert not timeline.request_found
    assert timeline.entries == []
    missing = run_cli("replay", str(scenario_log), "timeline", "0" * 64)
    assert "no events of this request" in missing.stdout


def test_timeline_of_generated_request_with_records(tmp_path: Path) -> None:
    pytest.importorskip("cortex.comm.records")
    generate_log(tmp_path / "events.db", 800, peers=4)
    with LogReader(tmp_path) as reader:
        submitted = next(reader.canonical(EventFilter(types=("RequestSubmitted",))))
        timeline = build_timeline(reader, request_id_for(submitted.author, submitted.body.nonce))
    types = [entry.event.type for entry in timeline.entries]
    assert types[0] == "RequestSubmitted"
    assert types[-1] == "RequestCompleted"
    assert types.count("TokenGenerated") == 12
    # 12 steps of two experts; the voted steps (0, 4 and 8) run each expert twice.
    voted = 3 if quorum_types() is not None else 0
    assert types.count("ExpertOutputProduced") == types.count("ExpertInputSent") == 24 + 2 * voted
    assert types.count("QuorumVoted") == types.count("QuorumDecided") == voted
    outputs = [entry for entry in timeline.entries if entry.event.type == "ExpertOutputProduced"]
    assert all(entry.depth == 1 for entry in outputs), "outputs ref the request id and their input record"
    labels = {part_label(part) for parts in timeline.served_by.values() for part in parts}
    assert any(label.startswith("expert[") and label.endswith(" output") for label in labels)
    assert any(label.endswith(" on route") for label in labels)


def test_part_label_forms() -> None:
    assert part_label({"type": "ExpertInputSent", "layer": 3, "expert": 7, "step": 8}) == "expert[3][7] input"
    assert part_label({"type": "StageOutputProduced", "start": 0, "stop": 8, "step": 0}) == "block[0:8] output"
    assert part_label({"type": "RequestAccepted", "route": "block[0:8]"}) == "block[0:8] on route"
    assert part_label({"type": "ShardLoaded", "fragment": "head"}) == "head ShardLoaded"


def test_part_label_quorum_events() -> None:
    vote = {"type": "QuorumVoted", "layer": 1, "experts": [0, 0, 0, 1, 1, 1], "step": 4, "producers": 3}
    decision = {"type": "QuorumDecided", "layer": 2, "experts": [5], "step": 4, "producers": 1}
    assert part_label(vote) == "layer 1 experts 0,1 vote of 3 producers"
    assert part_label(decision) == "layer 2 expert 5 decision of 1 producer"


def test_timeline_quorum_parts_and_time_tables(tmp_path: Path) -> None:
    if quorum_types() is None:
        pytest.skip("the quorum events are not importable")
    generate_log(tmp_path / "events.db", 800, peers=4)
    with LogReader(tmp_path) as reader:
        submitted = next(reader.canonical(EventFilter(types=("RequestSubmitted",))))
        timeline = build_timeline(reader, request_id_for(submitted.author, submitted.body.nonce))
    labels = [part_label(part) for parts in timeline.served_by.values() for part in parts]
    votes = [label for label in labels if " vote " in label]
    assert votes
    assert all(label.startswith("layer ") and label.endswith(" producers") for label in votes)
    assert not any("[0, " in label or "block=" in label for label in labels)

    human = run_cli("replay", str(tmp_path), "timeline", timeline.request_id)
    assert human.status == 0, human.stderr
    assert "where time went (each gap counts for the event that ends it):" in human.stdout
    assert "by event type" in human.stdout
    assert "by author" in human.stdout
