"""The node's side of degraded mode and driver takeover: what the node's hooks call.

- `missing_fragments`: the fragments of a served model with no live loaded holder, which
  make a new request degrade (docs/degraded.md).
- `prompt_readers_of`: the known peers a submission's prompt is sealed to; the driver seals
  token batches to them too, so the next driver in order can continue the text.
- `takeover_of`: the `Takeover` (previous driver, tokens streamed so far) of a request this
  node should take over now, read from the node's views and log.
- `fallback_context`: a `DriverContext` for a model this node does not serve, used when no
  live peer holds its head and this node is the request's fallback driver.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from cortex.driver.executors import BlockExecutor, Compute
from cortex.driver.fallback import FallbackModel
from cortex.driver.requests import DriverContext, Emit, Takeover
from cortex.driver.takeover import UnreadableStream, can_read, prompt_readers_known, streamed_tokens, takeover_due
from cortex.node.service import ModelService
from cortex.privacy import is_recipient
from cortex.registry import RegistryView
from cortex.scheduler.lifecycle import RequestRecord
from cortex.scheduler.request_events import (
    DRIVER_STOPPED,
    RequestAccepted,
    RequestFailed,
    RequestSubmitted,
    TokenGenerated,
    plan_digest,
)
from events import Event, Identity, LogStore

logger = logging.getLogger(__name__)


def missing_fragments(registry: RegistryView, service: ModelService, now_ms: int) -> list[str]:
    """Return the model's fragments (head, blocks covering every layer, experts) that no live peer loaded.

    Blocks count as covered when the loaded `block[a:b]` fragments of live peers cover every
    layer, whatever their boundaries.
    """
    from cortex.node.claims import fragment_sizes
    from events.shards import parse_fragment

    coverage = registry.coverage(service.model_id, now_ms)
    served = {fragment for fragment, holders in coverage.items() if holders.loaded}
    layers: set[int] = set()
    for fragment in served:
        parsed = parse_fragment(fragment)
        if parsed.kind == "block":
            layers.update(range(parsed.start, parsed.stop))
    missing = []
    for fragment in fragment_sizes(service.loader):
        parsed = parse_fragment(fragment)
        if parsed.kind == "block":
            if not set(range(parsed.start, parsed.stop)) <= layers:
                missing.append(fragment)
        elif fragment not in served:
            missing.append(fragment)
    return missing


def prompt_readers_of(registry: RegistryView, request: RequestSubmitted) -> list[str]:
    """Return the known peers that can open the request's prompt (the submitter's chosen drivers)."""
    sealed = request.sealed_prompt
    if not sealed:
        return []
    return sorted(peer for peer in registry.peers if is_recipient(sealed, peer))


def takeover_of(
    registry: RegistryView, store: LogStore, record: RequestRecord, identity: Identity, now_ms: int
) -> tuple[Event, Takeover | str] | None:
    """Return (RequestSubmitted event, what to do) when this node should take `record` over now, else None.

    What to do is a `Takeover`, or the message of the `RequestFailed` to publish instead when
    the text cannot go on here: no live peer can open the prompt, the streamed tokens cannot
    be read, or the silent driver was answering with its fallback model. Then the request
    ends rather than hangs.
    """
    previous = takeover_due(registry, record, identity.peer_id, now_ms)
    if previous is None:
        return None
    submission = next((fact for fact in record.facts.values() if isinstance(fact.body, RequestSubmitted)), None)
    if submission is None:
        return None
    stored = store.stored_at(submission.author, submission.seq)
    submitted = store.get(stored[0][0]) if stored else None
    if submitted is None:
        return None
    if not can_read(submission.body, identity.peer_id):
        readers = ", ".join(prompt_readers_known(registry, record))
        stopped = f"the driver {previous} stopped" if previous else "no driver accepted the request"
        return submitted, (
            f"{stopped} and no live peer can open the prompt (the submitter sealed it to "
            f"{readers or 'no other known peer'}); submit the request again"
        )
    drivers = set(record.drivers)
    batches = [
        event.body
        for event in store.events(type="TokenGenerated", ref=submitted.id)
        if event.author in drivers and isinstance(event.body, TokenGenerated)
    ]
    try:
        tokens, text = streamed_tokens(batches, identity)
    except UnreadableStream as error:
        return submitted, f"the driver {previous} stopped and this node cannot continue its text: {error}"
    if tokens and record.drivers and not record.route:
        return submitted, (
            f"the driver {previous} stopped while answering with its fallback model after {len(tokens)} tokens; "
            "an answer does not switch models, so it ends here"
        )
    return submitted, Takeover(previous, tokens, text)


async def end_taken_over(emit: Emit, record: RequestRecord, submitted: Event, message: str) -> None:
    """Accept `record` as its new driver (empty route) and fail it with DRIVER_STOPPED and `message`.

    Only a driver's RequestFailed counts once someone accepted the request, so the
    acceptance comes first.
    """
    previous = record.driver
    logger.warning("request %s ends: %s", record.request_id[:12], message)
    await emit(RequestAccepted(record.request_id, {}, {}, 0, plan_digest({}, {}, 0), previous), (submitted.id,))
    await emit(RequestFailed(record.request_id, DRIVER_STOPPED, message[:500]), (submitted.id,))


def fallback_context(
    identity: Identity,
    emit: Emit,
    model_id: str,
    compute: Compute,
    fallback: FallbackModel,
    records_of: Callable[[str], list[str]],
    readers: Callable[[RequestSubmitted], list[str]],
    settled: Callable[[], Awaitable[None]],
) -> DriverContext:
    """Return a DriverContext that can only generate with the fallback model, since this node lacks the head of `model_id`."""

    def no_blocks(spec: str, holder: str) -> BlockExecutor:
        raise AssertionError(f"a fallback-only driver runs no block ({spec} on {holder})")

    return DriverContext(
        identity=identity,
        emit=emit,
        model_id=model_id,
        head=None,
        tokenizer=None,
        eos_token_ids=[],
        geometry=None,
        compute=compute,
        planning=lambda own_request: None,  # type: ignore[arg-type,return-value]
        record=lambda request_id: None,
        executor_for=no_blocks,
        records_of=records_of,
        fallback=fallback,
        readers=readers,
        settled=settled,
    )
