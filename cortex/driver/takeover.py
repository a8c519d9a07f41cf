"""Who drives a request besides its first driver: takeover after a silent driver, and fallback drivers.

Readers. The submitter seals the prompt, and the driver seals every token batch, to the
first `1 + TAKEOVER_READERS` peers of the request's driver order (`prompt_readers`), so the
next drivers in that order can open the prompt and the text already streamed. Every peer
leaves out of the driver order the peers that cannot open the prompt (`readable_order`).

Takeover. A driver is silent when its last heartbeat is older than `DRIVER_SILENCE_MS`
(about five missed heartbeats). Each head holder checks the in-flight requests once a
heartbeat (`takeover_due`). When a request's driver is silent, or no driver accepted it within
`DRIVER_SILENCE_MS` of its submission while the driver the submitter chose is silent, the
first live peer of `driver_order` without the silent ones takes it over. It publishes
`RequestAccepted` with `takeover_of` set, replays the prompt and the tokens already streamed
(`streamed_tokens`) as one prefill, and streams on from the next step, so the submitter
receives no duplicated or changed token. When no peer that can open the prompt is live, the
first live head holder ends the request instead (`cortex.node.driving.takeover_of`).

One driver per request. Views differ for a moment, so two peers may both drive a request: a
stalled driver and its successor, two peers that took the same request over at once, or a
peer whose view lagged and accepted beside the driver. The node calls `superseded_by` on each
acceptance by another peer and stops its driver when that acceptance replaces it: it names
this node in `takeover_of`, or it competes for the same role (the same `takeover_of`) and
is the later one by stamp (lamport, author, seq), or this node has not accepted yet. Both
competitors reach the same decision from the two acceptances, so one driver goes on.

Fallback drivers. When no live peer holds a model's head, the request is driven by a live
peer that announced a fallback model: the submitter itself if it is such a peer, else the
first in rendezvous order over those peers (`fallback_order`). It answers degraded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from cortex.driver.fallback import FALLBACK_HARDWARE_KEY
from cortex.privacy import is_recipient
from cortex.registry import RegistryView
from cortex.registry.view import LOADED
from cortex.scheduler.content import StreamAssembler, open_token_batch
from cortex.scheduler.lifecycle import RequestRecord
from cortex.scheduler.planning import HEAD, driver_order, rendezvous_score
from cortex.scheduler.request_events import RequestAccepted, RequestSubmitted, TokenGenerated
from events import Event, Identity

logger = logging.getLogger(__name__)

TAKEOVER_READERS = 2
# A driver alive but stalled for longer than this is taken over too. Once it runs again and
# receives the successor's RequestAccepted, it stops driving (`Node._stop_taken_over`). The steps
# it streams before that repeat the successor's, with equal tokens only for greedy requests.
DRIVER_SILENCE_MS = 5_000
# How long a due takeover waits for events of the silent driver that peers announced but this
# node has not stored yet. An idle node fetches them about 2 s after the announcement (heads
# every 1 s, then two repair rounds 0.5 s apart). A node with a backlog of frames repairs later.
TAKEOVER_REPAIR_WAIT_MS = 5_000
# A request whose last event is older than this is history (a join sync), not a live request.
ABANDONED_AFTER_MS = 60_000


class UnreadableStream(Exception):
    """The tokens a previous driver streamed cannot all be opened here, so the text cannot go on."""


def fallback_order(registry: RegistryView, request_id: str, now_ms: int, submitter: str = "") -> list[str]:
    """Return the live peers with a fallback model in rendezvous order, the submitter first if it is one."""
    peers = [
        peer
        for peer, record in registry.peers.items()
        if record.announcement is not None
        and FALLBACK_HARDWARE_KEY in record.announcement.hardware
        and registry.is_live(peer, now_ms)
    ]
    ranked = sorted(peers, key=lambda peer: (bytes(255 - b for b in rendezvous_score(request_id, peer)), peer))
    if submitter in ranked:
        ranked.remove(submitter)
        ranked.insert(0, submitter)
    return ranked


def request_drivers(registry: RegistryView, model_id: str, request_id: str, now_ms: int, submitter: str = "") -> list[str]:
    """Return the driver order of a request: head holders, or fallback peers when none is live."""
    return driver_order(registry, model_id, request_id, now_ms, submitter) or fallback_order(registry, request_id, now_ms, submitter)


def prompt_readers(registry: RegistryView, model_id: str, request_id: str, now_ms: int, submitter: str = "") -> list[str]:
    """Return the peers a submission is sealed to besides the submitter: the driver and the next ones."""
    return request_drivers(registry, model_id, request_id, now_ms, submitter)[: 1 + TAKEOVER_READERS]


def can_read(request: RequestSubmitted, peer: str) -> bool:
    """Return whether `peer` can open the request's prompt (a prompt sent by digest counts as readable)."""
    return not request.sealed_prompt or is_recipient(request.sealed_prompt, peer)


def readable_order(order: list[str], request: RequestSubmitted) -> list[str]:
    """Return the peers of a driver order that can open the request's prompt, in order.

    Views differ for a moment between peers, so the submitter may seal to a driver order
    without a head holder that has just joined. Leaving out the peers that cannot read the
    prompt makes every peer pick the same driver among the ones the submitter chose.
    """
    return [peer for peer in order if can_read(request, peer)]


def is_silent(registry: RegistryView, peer: str, now_ms: int) -> bool:
    return not registry.is_live(peer, now_ms, timeout_ms=DRIVER_SILENCE_MS)


def takeover_due(registry: RegistryView, record: RequestRecord, me: str, now_ms: int) -> str | None:
    """Return the driver `me` takes `record` over from ("" if none accepted it), or None if not due.

    NOTE: only head holders call this, so a request driven by a fallback driver (no head holder
    anywhere) is not taken over when that driver dies.

    Due when the request is in flight and recent, its current driver is silent (or no driver
    accepted it within `DRIVER_SILENCE_MS` of its submission and `intended_driver` is silent),
    and `me` is the first peer of the driver order once the silent peers are left out. When no
    peer that can open the prompt is live (`LIVENESS_TIMEOUT_MS`, 15 s), the first live head
    holder is due all the same, to end the request (`takeover_of`) rather than leave it
    waiting for a driver that cannot come.
    """
    if not record.is_in_flight or record.submission is None or record.driver == me:
        return None
    last_activity = max(record.submitted_ms, record.accepted_ms, record.last_token_ms)
    if now_ms - last_activity > ABANDONED_AFTER_MS:
        return None
    model_id = record.submission.model_id
    unfiltered = driver_order(registry, model_id, record.request_id, now_ms, record.submitter)
    full = readable_order(unfiltered, record.submission)
    silent = {peer for peer in [*unfiltered, *record.drivers] if is_silent(registry, peer, now_ms)}
    if record.driver:
        if record.driver not in silent:
            return None
        previous = record.driver
    elif now_ms - record.submitted_ms < DRIVER_SILENCE_MS or not is_silent(registry, intended_driver(registry, record), now_ms):
        return None
    else:
        # No driver accepted it: the driver the submitter chose died, perhaps before the views counted it dead.
        previous = ""
    order = [peer for peer in full if peer not in silent]
    if not order and not any(registry.is_live(peer, now_ms) for peer in prompt_readers_known(registry, record)):
        # Ending cannot be undone, so it waits for the registry's longer liveness limit: a
        # reader that is only stalled, or whose heartbeats are late here, still gets the request.
        order = [peer for peer in unfiltered if peer not in silent]
    return previous if order and order[0] == me else None


def prompt_readers_known(registry: RegistryView, record: RequestRecord) -> list[str]:
    """Return the known peers besides the submitter that can open the request's prompt, and its drivers."""
    assert record.submission is not None
    readers = [peer for peer in registry.peers if peer != record.submitter and can_read(record.submission, peer)]
    return sorted({*readers, *record.drivers})


def intended_driver(registry: RegistryView, record: RequestRecord) -> str:
    """Return the driver the submitter chose: the first prompt reader in rendezvous order, live or not.

    A submitter that held the head when it submitted drives its own request. Returns "" when
    no known peer besides the submitter can open the prompt.
    """
    assert record.submission is not None
    readers = [peer for peer in registry.peers if peer != record.submitter and can_read(record.submission, peer)]
    if record.submitter in registry.holders(record.submission.model_id, "head", record.submitted_ms):
        return record.submitter
    ranked = sorted(readers, key=lambda peer: (bytes(255 - b for b in rendezvous_score(record.request_id, peer)), peer))
    return ranked[0] if ranked else ""


def may_drive(registry: RegistryView, model_id: str, peer: str) -> bool:
    """Return whether `peer` announced what driving `model_id` takes: the model's head, loaded, or a fallback model.

    Liveness is left out, because peers' clocks and heartbeats differ and all must agree.
    NOTE: returns False while this node has not stored the peer's `ShardLoaded` or
    `PeerJoined` yet. Both announce a peer long before it can accept a request.
    """
    shard = registry.shards.get((peer, model_id, HEAD))
    if shard is not None and shard.state == LOADED:
        return True
    record = registry.peers.get(peer)
    return record is not None and record.announcement is not None and FALLBACK_HARDWARE_KEY in record.announcement.hardware


def superseded_by(registry: RegistryView, record: RequestRecord, me: str, role: str, accepted: Event) -> str:
    """Return why `me` stops driving `record` now that `accepted`, another peer's acceptance of it, arrived; "" if it drives on.

    `role` is the driver that `me` took the request over from, "" for a first driver: the
    `takeover_of` of `me`'s acceptance. `me` stops when `accepted` names it in `takeover_of`:
    a successor replaced it while it was silent. Any author counts here, because a node woken
    after a stall may not have stored its successor's `ShardLoaded` yet. `me` also
    stops when `accepted` has the same `takeover_of` and its author `may_drive` the model, if
    `me` has not accepted in that role yet or accepted earlier by stamp. Other acceptances
    stop nothing: a late or stale one of the driver that `me` replaces, or one in that role
    by a peer that cannot drive the model (logged as a warning).
    """
    body: RequestAccepted = accepted.body
    successor = accepted.author
    if body.takeover_of == me:
        return f"was taken over by {successor} while this node was silent for more than {DRIVER_SILENCE_MS // 1000} s"
    if body.takeover_of != role:
        return ""
    if not may_drive(registry, record.model_id, successor):
        logger.warning(
            "request %s: ignoring the acceptance by %s, which this node does not know to hold the head of model %s or a fallback model",
            body.request_id[:12], successor, record.model_id[:12],
        )
        return ""
    mine = [
        stamp
        for stamp, fact in record.facts.items()
        if fact.author == me and isinstance(fact.body, RequestAccepted) and fact.body.takeover_of == role
    ]
    if not mine:
        return f"was accepted by {successor} before this node's driver accepted it"
    if (accepted.lamport, accepted.author, accepted.seq) > max(mine):
        return f"was also accepted by {successor} in place of the same previous driver, and that acceptance is the later one"
    return ""


def streamed_tokens(batches: Iterable[TokenGenerated], identity: Identity) -> tuple[list[int], str]:
    """Return the token ids and text a request's drivers streamed, in step order, opened with `identity`.

    Pass the batches by the request's drivers that reached this node; batches of two drivers
    may overlap (`StreamAssembler`). Raises UnreadableStream when a batch is sealed to other
    readers or steps are missing before the last one streamed.
    """
    assembler = StreamAssembler()
    last = 0
    # Among batches of one first step the longest comes first, so one without text ends is used whole.
    for body in sorted(batches, key=lambda body: (body.step_start, -body.step_stop)):
        try:
            assembler.add(open_token_batch(body, identity))
        except Exception as error:  # noqa: BLE001 - NotARecipient or a broken seal: the text cannot go on here
            raise UnreadableStream(f"tokens at steps {body.step_start} to {body.step_stop} cannot be opened here: {error}") from error
        last = max(last, body.step_stop)
    if len(assembler.token_ids) < last:
        raise UnreadableStream(
            f"steps from {len(assembler.token_ids)} on are missing here, though steps up to {last} were streamed"
        )
    if assembler.conflicts:
        logger.warning("two drivers streamed different tokens at steps %s; the replay keeps the first ones", assembler.conflicts)
    return assembler.token_ids, assembler.text
