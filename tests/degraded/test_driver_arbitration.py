"""One driver per request: which acceptance by another peer stops a driver, and a woken driver waiting before it accepts."""

from __future__ import annotations

import asyncio
import secrets

import pytest

import cortex.node.node as node_module
from cortex.driver.fallback import FALLBACK_HARDWARE_KEY
from cortex.driver.requests import Takeover
from cortex.driver.takeover import may_drive, superseded_by
from cortex.node.driving import fallback_context
from cortex.node.node import Node
from cortex.privacy import seal
from cortex.registry import RegistryReducer, RegistryView
from cortex.scheduler import RequestAccepted, RequestSubmitted
from cortex.scheduler.lifecycle import RequestRecord
from cortex.scheduler.request_events import plan_digest, request_id_for
from cortex.scheduler.view import SchedulerReducer, fold
from events import Event, Identity, PeerHeartbeat, PeerJoined, ShardClaimed, ShardLoaded, sign_event
from events.views import Projection

MODEL_ID = "ab" * 32
SUBMITTER = Identity.generate()
FIRST = Identity.generate()
SECOND = Identity.generate()
BYSTANDER = Identity.generate()  # joined, but has no head and announced no fallback model
FALLBACK = Identity.generate()
CLAIMER = Identity.generate()  # claimed the head but has not loaded it
SILENT = Identity.generate()  # the driver the others take the request over from


def _joined(identity: Identity, *, head: bool, hardware: dict[str, int | str | bool] | None = None) -> list[Event]:
    joined = PeerJoined(
        ("/ip4/127.0.0.1/tcp/4001",), "tcp://127.0.0.1:5555", identity.curve_public_key.decode(), hardware or {"cpus": 2}, "1.0", "0.1.0"
    )
    events = [sign_event(identity, joined, seq=1, lamport=1, time_ms=1_000)]
    if head:
        events.append(sign_event(identity, ShardLoaded(MODEL_ID, "head", 10), seq=2, lamport=2, time_ms=1_000))
    events.append(sign_event(identity, PeerHeartbeat(len(events)), seq=len(events) + 1, lamport=3, time_ms=1_500))
    return events


def _registry(events: list[Event]) -> RegistryView:
    reducer = RegistryReducer()
    view = reducer.empty()
    for event in events:
        view = reducer.apply(view, event)
    return view


def _submitted() -> tuple[Event, str]:
    body = RequestSubmitted(secrets.token_hex(16), MODEL_ID, 8, 12, sealed_prompt=seal(b"Return the number", [SUBMITTER.peer_id, FIRST.peer_id]))
    event = sign_event(SUBMITTER, body, seq=1, lamport=1, time_ms=2_000)
    return event, request_id_for(SUBMITTER.peer_id, body.nonce)


def _accepted(identity: Identity, request_id: str, submitted: Event, lamport: int, takeover_of: str = "") -> Event:
    body = RequestAccepted(request_id, {}, {}, 0, plan_digest({}, {}, 0), takeover_of)
    return sign_event(identity, body, seq=10, lamport=lamport, time_ms=2_100, refs=(submitted.id,))


def _members() -> list[Event]:
    claimed = sign_event(CLAIMER, ShardClaimed(MODEL_ID, "head", 10), seq=9, lamport=9, time_ms=1_000)
    return [
        *_joined(FIRST, head=True),
        *_joined(SECOND, head=True),
        *_joined(SILENT, head=True),
        *_joined(BYSTANDER, head=False),
        *_joined(FALLBACK, head=False, hardware={"cpus": 2, FALLBACK_HARDWARE_KEY: "demo"}),
        *_joined(CLAIMER, head=False),
        claimed,
    ]


def _record(events: list[Event], request_id: str) -> RequestRecord:
    return fold(events).requests[request_id]


REGISTRY = _registry(_members())


def test_superseded_by_successor_naming_this_node() -> None:
    submitted, request_id = _submitted()
    mine = _accepted(FIRST, request_id, submitted, lamport=5)
    successor = _accepted(SECOND, request_id, submitted, lamport=9, takeover_of=FIRST.peer_id)
    record = _record([submitted, mine, successor], request_id)

    assert superseded_by(REGISTRY, record, FIRST.peer_id, "", successor).startswith(f"was taken over by {SECOND.peer_id}")
    # The successor's role is the stalled driver: that driver's acceptance does not stop it.
    assert superseded_by(REGISTRY, record, SECOND.peer_id, FIRST.peer_id, mine) == ""


def test_superseded_by_later_competitor_same_role() -> None:
    submitted, request_id = _submitted()
    first = _accepted(FIRST, request_id, submitted, lamport=5, takeover_of=SILENT.peer_id)
    second = _accepted(SECOND, request_id, submitted, lamport=7, takeover_of=SILENT.peer_id)

    for order in ([submitted, first, second], [second, submitted, first]):
        record = _record(order, request_id)
        assert "the later one" in superseded_by(REGISTRY, record, FIRST.peer_id, SILENT.peer_id, second)
        assert superseded_by(REGISTRY, record, SECOND.peer_id, SILENT.peer_id, first) == ""
        assert record.driver == SECOND.peer_id  # the view names the driver that goes on


def test_superseded_by_lamport_tie_by_author() -> None:
    submitted, request_id = _submitted()
    first = _accepted(FIRST, request_id, submitted, lamport=6)
    second = _accepted(SECOND, request_id, submitted, lamport=6)
    record = _record([submitted, first, second], request_id)

    first_stops = bool(superseded_by(REGISTRY, record, FIRST.peer_id, "", second))
    second_stops = bool(superseded_by(REGISTRY, record, SECOND.peer_id, "", first))
    assert first_stops != second_stops
    assert first_stops == (FIRST.peer_id < SECOND.peer_id)


def test_superseded_by_before_own_acceptance() -> None:
    submitted, request_id = _submitted()
    stale = _accepted(SILENT, request_id, submitted, lamport=3)
    rival = _accepted(SECOND, request_id, submitted, lamport=8, takeover_of=SILENT.peer_id)

    # FIRST runs a takeover of SILENT and has not accepted yet: a rival takeover wins.
    record = _record([submitted, stale, rival], request_id)
    assert "before this node's driver accepted it" in superseded_by(REGISTRY, record, FIRST.peer_id, SILENT.peer_id, rival)
    # The stale acceptance of the driver it replaces, arriving late, does not stop it.
    assert superseded_by(REGISTRY, record, FIRST.peer_id, SILENT.peer_id, stale) == ""


def test_superseded_by_ignores_other_roles() -> None:
    # A stalled driver that wakes up may accept again to degrade, naming no previous driver.
    # Its successor took the request over from it, so that acceptance does not stop the successor.
    submitted, request_id = _submitted()
    successor = _accepted(SECOND, request_id, submitted, lamport=9, takeover_of=FIRST.peer_id)
    degraded = _accepted(FIRST, request_id, submitted, lamport=40)
    record = _record([submitted, successor, degraded], request_id)

    assert superseded_by(REGISTRY, record, SECOND.peer_id, FIRST.peer_id, degraded) == ""


def test_superseded_by_ignores_non_drivers(caplog: pytest.LogCaptureFixture) -> None:
    submitted, request_id = _submitted()
    mine = _accepted(FIRST, request_id, submitted, lamport=5)
    for author in (BYSTANDER, CLAIMER, Identity.generate()):
        later = _accepted(author, request_id, submitted, lamport=9)
        caplog.clear()
        assert superseded_by(REGISTRY, _record([submitted, mine, later], request_id), FIRST.peer_id, "", later) == "", author
        assert f"ignoring the acceptance by {author.peer_id}" in caplog.text

    by_fallback = _accepted(FALLBACK, request_id, submitted, lamport=9)
    record = _record([submitted, mine, by_fallback], request_id)
    assert "the later one" in superseded_by(REGISTRY, record, FIRST.peer_id, "", by_fallback)


def test_may_drive_needs_loaded_head_or_fallback() -> None:
    assert may_drive(REGISTRY, MODEL_ID, FIRST.peer_id)
    assert may_drive(REGISTRY, MODEL_ID, FALLBACK.peer_id)
    assert not may_drive(REGISTRY, MODEL_ID, BYSTANDER.peer_id)
    assert not may_drive(REGISTRY, MODEL_ID, CLAIMER.peer_id)
    assert not may_drive(REGISTRY, "cd" * 32, FIRST.peer_id)


def test_may_drive_ignores_liveness() -> None:
    # Both drivers must reach the same decision, whatever heartbeats each has seen.
    assert not REGISTRY.is_live(SECOND.peer_id, 100_000)
    assert may_drive(REGISTRY, MODEL_ID, SECOND.peer_id)


class _Driver:
    """What `Node._start_driver` reads of a `RequestDriver`: its request, takeover and run()."""

    def __init__(self, request_id: str, previous_driver: str) -> None:
        self.request_id = request_id
        self.takeover = Takeover(previous_driver, [], "") if previous_driver else None

    async def run(self) -> None:
        await asyncio.sleep(3600)


def _node(me: Identity, events: list[Event], group: asyncio.TaskGroup) -> Node:
    """A Node with only what starting and stopping drivers reads: identity, views, task group."""
    node = Node.__new__(Node)
    node.peer_id = me.peer_id
    node.registry = Projection(RegistryReducer())
    node.scheduler = Projection(SchedulerReducer())
    for event in [*_members(), *events]:
        node.registry.apply(event)
        node.scheduler.apply(event)
    node.drivers, node._roles, node.driving = {}, {}, set()
    node._task_group = group
    return node


async def test_node_stops_takeover_for_rival_takeover() -> None:
    submitted, request_id = _submitted()
    stale = _accepted(SILENT, request_id, submitted, lamport=3)
    async with asyncio.TaskGroup() as group:
        node = _node(FIRST, [submitted, stale], group)
        node._start_driver(_Driver(request_id, SILENT.peer_id))  # type: ignore[arg-type]
        task = node.drivers[request_id]
        await asyncio.sleep(0)

        # The driver it replaces accepting again (late) stops nothing.
        late = _accepted(SILENT, request_id, submitted, lamport=4)
        node.scheduler.apply(late)
        node._stop_taken_over(late)
        await asyncio.sleep(0)
        assert not task.done()

        rival = _accepted(SECOND, request_id, submitted, lamport=8, takeover_of=SILENT.peer_id)
        node.scheduler.apply(rival)
        node._stop_taken_over(rival)
        await asyncio.wait({task})
        await asyncio.sleep(0)  # the done callbacks run one iteration later
        assert task.cancelled()
        assert request_id not in node.drivers
        assert request_id not in node._roles


async def test_node_keeps_first_driver_for_takeover_elsewhere() -> None:
    submitted, request_id = _submitted()
    async with asyncio.TaskGroup() as group:
        node = _node(FIRST, [submitted], group)
        node._start_driver(_Driver(request_id, ""))  # type: ignore[arg-type]
        task = node.drivers[request_id]
        # Another peer took the request over from a third one: not this driver's role.
        other = _accepted(SECOND, request_id, submitted, lamport=8, takeover_of=SILENT.peer_id)
        node.scheduler.apply(other)
        node._stop_taken_over(other)
        await asyncio.sleep(0)

        assert not task.done()
        task.cancel()


async def test_node_settled_waits_out_catch_up(monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node.__new__(Node)
    node.stopping = asyncio.Event()
    node._catch_up_since = None
    node._last_tick = node_module._clock() - 10.0  # stopped, and the stall watch has not run since

    settled = asyncio.ensure_future(node._settled())
    await asyncio.sleep(2 * node_module.CATCH_UP_POLL_S)
    assert not settled.done()
    node._last_tick = node_module._clock()  # the stall watch ran: caught up (no stall recorded)
    await asyncio.wait_for(settled, 5.0)

    # A heartbeat loop held up forever does not hold a driver back past SETTLE_MAX_S.
    monkeypatch.setattr(node_module, "SETTLE_MAX_S", 2 * node_module.CATCH_UP_POLL_S)
    node._last_tick = node_module._clock() - 10.0
    await asyncio.wait_for(node._settled(), 5.0)
    assert node._catching_up()

    # A stopping node does not wait: its drivers finish within the drain.
    monkeypatch.setattr(node_module, "SETTLE_MAX_S", 3600.0)
    node.stopping.set()
    await asyncio.wait_for(node._settled(), 5.0)


def test_fallback_context_waits_for_catch_up() -> None:
    async def settled() -> None:
        return None

    context = fallback_context(
        FIRST, lambda body, refs: None, MODEL_ID, lambda function, *args: None, None, lambda request_id: [],  # type: ignore[arg-type,return-value]
        lambda submitted: [], settled,
    )  # fmt: skip
    assert context.settled is settled
