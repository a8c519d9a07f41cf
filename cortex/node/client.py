"""SwarmClient: joins the bus without serving anything, submits requests and follows them.

Used by `cortex submit` and `cortex demo`. The client has its own identity (the
submitter), seals the prompt to the request's driver and the next peers of its driver order
(`cortex.driver.takeover.prompt_readers`: head holders, or peers with a fallback model when
no head holder is live), and yields the request's events as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.bus.bus import BusConfig, GossipBus
from cortex.bus.transport import Transport
from cortex.registry import RegistryReducer, RegistryView
from cortex.scheduler.content import OpenedBatch, StreamAssembler, new_nonce, open_token_batch, prepare_submission
from cortex.driver.takeover import prompt_readers
from cortex.scheduler.request_events import (
    RequestAccepted,
    RequestCompleted,
    RequestFailed,
    RouteReplanned,
    TokenGenerated,
    request_id_for,
)
from events import Acceptor, Event, EventWriter, Identity, LogStore, Projection, wall_clock_ms

logger = logging.getLogger(__name__)

LATE_TOKENS_S = 10.0
_MODEL_ID = re.compile(r"^[0-9a-f]{64}$")


class ClientError(Exception):
    """The swarm cannot take the request: unknown model, no head holder, a timeout."""


@dataclass
class RequestResult:
    """The events a client received for one request: tokens, text, route and outcome."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    driver: str = ""
    route: dict[str, str] = field(default_factory=dict)
    completed: RequestCompleted | None = None
    failed: RequestFailed | None = None
    replans: list[RouteReplanned] = field(default_factory=list)
    token_event_times_ms: list[int] = field(default_factory=list)


class SwarmClient:
    """A bus participant with a log and a Registry view that only submits requests."""

    def __init__(self, data_dir: Path, transport_factory: Any) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(data_dir / "client.key")
        self.store = LogStore(data_dir / "events.db")
        self.registry: Projection[RegistryView] = Projection(RegistryReducer())
        self.acceptor = Acceptor(self.store, [self.registry], own_peer_id=self.identity.peer_id)
        self.writer = EventWriter(self.identity, self.acceptor)
        transport: Transport = transport_factory(self.identity, data_dir)
        self.bus = GossipBus(transport, self.acceptor, BusConfig(join_wait_s=5.0))
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self.bus.add_listener(self._on_events)

    async def start(self) -> None:
        await self.bus.start()

    async def stop(self) -> None:
        await self.bus.stop()
        self.writer.close()
        self.store.close()

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            request_id = getattr(event.body, "request_id", None)
            queue = self._queues.get(request_id) if request_id else None
            if queue is not None:
                queue.put_nowait(event)

    def resolve_model(self, model: str) -> str:
        """Return the model id of a checkpoint folder, a model id, or a name announced in the swarm."""
        if _MODEL_ID.match(model):
            return model
        if Path(model).joinpath("config.json").exists():
            from cortex.runtime.model_id import model_id

            return model_id(Path(model))
        for record in self.registry.view.peers.values():
            announced = record.announcement
            if announced is not None and isinstance(announced.hardware.get(f"model:{model}"), str):
                return str(announced.hardware[f"model:{model}"])
        known = sorted(
            key.removeprefix("model:")
            for record in self.registry.view.peers.values()
            if record.announcement is not None
            for key in record.announcement.hardware
            if key.startswith("model:")
        )
        raise ClientError(f"model {model!r} is not a checkpoint folder, a model id or a name in the swarm (known: {known})")

    async def wait_for_model(self, model_id: str, fragments: set[str], timeout_s: float) -> list[str]:
        """Wait until every fragment in `fragments` has a live holder; return the head holders."""
        deadline = time.monotonic() + timeout_s
        while True:
            coverage = self.registry.view.coverage(model_id, wall_clock_ms())
            missing = {f for f in fragments if not coverage.get(f) or not coverage[f].loaded}
            heads = list(coverage["head"].loaded) if "head" in coverage else []
            if heads and not missing:
                return heads
            if time.monotonic() > deadline:
                raise ClientError(
                    f"model {model_id[:16]} is not served within {timeout_s} s: "
                    f"{'no live head holder' if not heads else f'{len(missing)} fragments have no live holder'}"
                )
            await asyncio.sleep(0.1)

    async def submit(
        self,
        model_id: str,
        prompt: str,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        deadline_ms: int = 0,
        redundancy: int = 1,
    ) -> str:
        """Publish a RequestSubmitted sealed to the request's driver and next drivers; return the request id.

        `deadline_ms` (0: none) is the time from submission to the first token after which the
        driver answers with its fallback model instead (docs/degraded.md). `redundancy` (1 to 8)
        is the number of replicas each expert call goes to, compared by quorum (docs/quorum.md).
        """
        me = self.identity.peer_id
        nonce = new_nonce()
        request_id = request_id_for(me, nonce)
        readers = prompt_readers(self.registry.view, model_id, request_id, wall_clock_ms(), submitter=me)
        if not readers:
            raise ClientError(
                f"no live peer holds the head of model {model_id[:16]} and none has a fallback model, so no node can "
                "answer; start a node that serves this model"
            )
        try:
            prepared = prepare_submission(
                me, readers, model_id, prompt, max_tokens=max_tokens, nonce=nonce, stop=stop,
                temperature=temperature, top_p=top_p, seed=seed, deadline_ms=deadline_ms, redundancy=redundancy,
            )
        except ValueError as error:
            raise ClientError(str(error)) from None
        if prepared.data_plane_prompt is not None:
            # NOTE: prompts too large to seal into the event need a data-plane transfer, not written yet.
            raise ClientError(f"a prompt of {len(prompt.encode())} bytes is too large to send inline; shorten it")
        self._queues[request_id] = asyncio.Queue()
        event = self.writer.write(prepared.body)
        await self.bus.publish(event)
        await self.bus.flush()
        return request_id

    async def follow(self, request_id: str, timeout_s: float) -> AsyncIterator[tuple[Event, OpenedBatch | None]]:
        """Yield (event, opened token batch or None) for the request until it completes or fails.

        Gossip does not keep one author's events in order. So after `RequestCompleted` the
        client keeps reading until every step below `completion_tokens` arrived, or for at most
        `LATE_TOKENS_S`, while anti-entropy fetches missing batches. Steps that two drivers
        streamed (a takeover) count once, and steps past the completion do not count.
        """
        queue = self._queues[request_id]
        deadline = time.monotonic() + timeout_s
        steps: set[int] = set()
        expected: int | None = None
        events = 0
        while expected is None or sum(step < expected for step in steps) < expected:
            remaining = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(queue.get(), max(remaining, 0.001))
            except TimeoutError:
                if expected is not None:
                    arrived = sum(step < expected for step in steps)
                    logger.warning("request %s: %d of %d tokens arrived", request_id[:12], arrived, expected)
                    break
                if events == 0:
                    raise ClientError(
                        f"request {request_id[:12]} received no response within {timeout_s} s; check that a node serving the model is live"
                    ) from None
                raise ClientError(
                    f"request {request_id[:12]} did not finish within {timeout_s} s: {events} events and {len(steps)} "
                    "tokens arrived, then neither a completion nor a failure; see the request's events with `cortex tail`"
                ) from None
            events += 1
            body = event.body
            opened = open_token_batch(body, self.identity) if isinstance(body, TokenGenerated) else None
            if opened is not None:
                steps.update(range(opened.step_start, opened.step_stop))
            yield event, opened
            if isinstance(body, RequestFailed):
                break
            if isinstance(body, RequestCompleted):
                expected = body.completion_tokens
                deadline = min(deadline, time.monotonic() + LATE_TOKENS_S)
        self._queues.pop(request_id, None)

    async def run(self, request_id: str, timeout_s: float, on_text: Any = None) -> RequestResult:
        """Follow a request to its end, joining token batches in step order, and return what arrived."""
        result = RequestResult(request_id)
        stream = StreamAssembler()
        async for event, opened in self.follow(request_id, timeout_s):
            body = event.body
            if isinstance(body, RequestAccepted):
                result.driver, result.route = event.author, dict(body.route)
            elif isinstance(body, RouteReplanned):
                result.replans.append(body)
                result.route = dict(body.route)
            elif opened is not None:
                result.token_event_times_ms.append(event.time_ms)
                conflicts = len(stream.conflicts)
                for _, text in stream.add(opened):
                    if on_text is not None and text:
                        on_text(text)
                if len(stream.conflicts) > conflicts:
                    logger.warning(
                        "request %s: two drivers streamed different tokens at steps %s; the text keeps the first ones",
                        request_id[:12], stream.conflicts[conflicts:],
                    )
            elif isinstance(body, RequestCompleted):
                result.completed = body
            elif isinstance(body, RequestFailed):
                result.failed = body
        result.token_ids, result.text = stream.token_ids, stream.text
        return result
