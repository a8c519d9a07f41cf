"""A request end to end through real log stores: submit, admit, stream, re-plan, complete.

Three nodes (submitter, driver, outsider) each keep their own SQLite log with Registry and
Scheduler views. Every event a node writes is accepted by the others, as the bus delivers it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scheduler_swarm import GEOMETRY, MODEL, peer_events

from cortex.privacy import NotARecipient
from cortex.registry import RegistryReducer, RegistryView
from cortex.scheduler import (
    COMPLETED,
    FAILED,
    RUNNING,
    KvBudgetExceeded,
    PlanningContext,
    RequestCompleted,
    SchedulerReducer,
    SchedulerView,
    admit,
    choose_driver,
    records_digest,
    replan_route,
    request_failed_for,
)
from cortex.scheduler.content import TokenBatcher, new_nonce, open_prompt, open_tokens, prepare_submission
from events import Acceptor, Event, EventWriter, Identity, LogStore, PeerLeft, Projection, sign_event

NOW_MS = 2_000
HOLDERS = sorted((Identity.generate() for _ in range(3)), key=lambda identity: identity.peer_id)


@dataclass
class Node:
    identity: Identity
    acceptor: Acceptor
    writer: EventWriter
    registry: Projection[RegistryView]
    scheduler: Projection[SchedulerView]

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    started = []
    for name in ("submitter", "driver", "outsider"):
        identity = Identity.generate()
        registry = Projection(RegistryReducer())
        scheduler = Projection(SchedulerReducer())
        acceptor = Acceptor(LogStore(tmp_path / f"{name}.db"), [registry, scheduler], own_peer_id=identity.peer_id)
        writer = EventWriter(identity, acceptor, clock_ms=lambda: NOW_MS)
        started.append(Node(identity, acceptor, writer, registry, scheduler))
    yield started
    for node in started:
        node.acceptor.store.close()


def publish(nodes: list[Node], author: Node, event: Event) -> None:
    for node in nodes:
        if node is not author:
            node.acceptor.accept(event.wire)


def write(nodes: list[Node], author: Node, body: object, refs: tuple[str, ...] = ()) -> Event:
    event = author.writer.write(body, refs=refs)
    publish(nodes, author, event)
    return event


def start_swarm(nodes: list[Node], budget: int) -> None:
    """Load block[0:2] on HOLDERS[0], block[2:4] on HOLDERS[1] and HOLDERS[2], and the head on the driver."""
    events = peer_events(HOLDERS[0], ["block[0:2]"], kv_budget=budget)
    events += peer_events(HOLDERS[1], ["block[2:4]"], kv_budget=budget)
    events += peer_events(HOLDERS[2], ["block[2:4]"], kv_budget=budget)
    for event in events:
        for node in nodes:
            node.acceptor.accept(event.wire)
    driver = nodes[1]
    for event in peer_events(driver.identity, ["head"]):
        write(nodes, driver, event.body)


def submit(nodes: list[Node], prompt: str, max_tokens: int) -> tuple[str, Event]:
    submitter = nodes[0]
    nonce = new_nonce()
    prepared = prepare_submission(submitter.peer_id, [], MODEL, prompt, max_tokens=max_tokens, nonce=nonce)
    driver = choose_driver(submitter.registry.view, MODEL, prepared.request_id, NOW_MS, submitter=submitter.peer_id)
    assert driver == nodes[1].peer_id
    prepared = prepare_submission(submitter.peer_id, [driver], MODEL, prompt, max_tokens=max_tokens, nonce=nonce)
    return prepared.request_id, write(nodes, submitter, prepared.body)


def test_request_flow_end_to_end(nodes: list[Node]) -> None:
    submitter, driver, outsider = nodes
    start_swarm(nodes, budget=10_000)
    request_id, submitted = submit(nodes, "tell me", max_tokens=6)
    refs = (submitted.id,)

    record = driver.scheduler.view.record(request_id)
    assert record is not None
    assert record.submission is not None
    assert open_prompt(record.submission, driver.identity) == "tell me"
    with pytest.raises(NotARecipient):
        open_prompt(record.submission, outsider.identity)
    plan = admit(PlanningContext(driver.registry.view, driver.scheduler.view, NOW_MS), MODEL, GEOMETRY, prompt_tokens=2, max_tokens=6)
    write(nodes, driver, plan.accepted(request_id), refs)
    batcher = TokenBatcher(request_id, (submitter.peer_id, driver.peer_id), max_tokens=2)
    for step, token in enumerate([7, 8, 9]):
        batch = batcher.add(token, f"t{step}", now_ms=NOW_MS)
        if batch is not None:
            write(nodes, driver, batch, refs)
    running = submitter.scheduler.view.record(request_id)
    assert running is not None
    assert running.state == RUNNING

    failed = plan.route["block[2:4]"]
    failed_identity = next(identity for identity in HOLDERS if identity.peer_id == failed)
    left = sign_event(failed_identity, PeerLeft("stopped"), seq=3, lamport=30, time_ms=NOW_MS)
    for node in nodes:
        node.acceptor.accept(left.wire)
    record = driver.scheduler.view.record(request_id)
    assert record is not None
    context = PlanningContext(driver.registry.view, driver.scheduler.view, NOW_MS, own_request=request_id)
    new_plan = replan_route(context, record, GEOMETRY, failed={failed})
    replacement = next(identity.peer_id for identity in HOLDERS[1:] if identity.peer_id != failed)
    assert new_plan.changes_from(plan.route) == {"block[2:4]": (failed, replacement)}
    write(nodes, driver, new_plan.replanned(request_id, failed, "holder_failed", resume_step=2), refs)
    last = batcher.flush()
    assert last is not None
    write(nodes, driver, last, refs)
    digest, count = records_digest([submitted.id])
    write(nodes, driver, RequestCompleted(request_id, 2, 3, "length", {"decode": 2, "total": 3}, digest, count), refs)

    assert len({node.scheduler.view.digest() for node in nodes}) == 1
    final = outsider.scheduler.view.record(request_id)
    assert final is not None
    assert final.state == COMPLETED
    assert final.route == new_plan.route
    assert final.replans == 1
    assert final.completion_tokens == 3
    assert outsider.scheduler.view.kv_reserved_by_holder() == {}
    batches = list(submitter.acceptor.store.events(type="TokenGenerated"))
    opened = [open_tokens(event.body, submitter.identity) for event in batches]
    assert [token for token_ids, _ in opened for token in token_ids] == [7, 8, 9]
    assert "".join(text for _, text in opened) == "t0t1t2"
    with pytest.raises(NotARecipient):
        open_tokens(batches[0].body, outsider.identity)


def test_admission_refusal_reaches_everyone(nodes: list[Node]) -> None:
    submitter, driver, outsider = nodes
    start_swarm(nodes, budget=1_000)
    request_id, submitted = submit(nodes, "a long story please", max_tokens=50)

    with pytest.raises(KvBudgetExceeded) as raised:
        admit(PlanningContext(driver.registry.view, driver.scheduler.view, NOW_MS), MODEL, GEOMETRY, prompt_tokens=5, max_tokens=50)
    write(nodes, driver, request_failed_for(request_id, raised.value), (submitted.id,))

    for node in nodes:
        record = node.scheduler.view.record(request_id)
        assert record is not None
        assert record.state == FAILED
        assert node.scheduler.view.in_flight() == []
    outcome = submitter.scheduler.view.record(request_id)
    assert outcome is not None
    assert outcome.outcome_author == driver.peer_id
    assert "needs 11,000 KV-cache bytes" in getattr(outcome.outcome, "message", "")
