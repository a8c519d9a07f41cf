"""Checks of every received message, cheap checks first, and the tensors they yield.

For each record of a call or reply, in this order:

1. the parts match the header's chunk counts (`truncated` if parts are missing);
2. the record event decodes (`malformed_event`, `oversized` for an event over 64 KiB);
3. it is a record type the receiver knows (`unknown_record_type`, not penalized: the sender
   runs a newer version) and accepts (`unexpected_type`);
4. dtype, size limit, shape times item size, chunk lengths (`bad_dtype`, `oversized`,
   `shape_mismatch`, `length_mismatch`);
5. all records share one author and one request id, the first entry of `refs`, and have
   distinct tensor names (`malformed`);
6. the author is the CurveZMQ-authenticated peer (`unauthenticated`, `author_mismatch`);
7. a reply references the call's input records after the request id (`unlinked_reply`);
8. the request is known to this node (`unknown_request`);
9. the Ed25519 signature (`bad_signature`), verified by the Acceptor when one is wired, which
   also appends the events to the log (a moment later, in a group: the DataPlane
   schedules its flush);
10. the digest of the bytes matches the record (`bad_digest`).

A record whose digest fails after step 9 stays in the log: it is signed by its author and,
with the bytes received over that author's authenticated channel, it is evidence that the
author sent inconsistent data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq

from cortex.comm.buffers import BufferPool, assemble_entries
from cortex.comm.errors import FrameReason, FrameRejected
from cortex.comm.frames import MAX_MESSAGE_BYTES, MAX_TENSOR_BYTES, Header, check_digest, check_tensor, split_records
from cortex.comm.messages import ReceivedTensor
from cortex.comm.records import TensorEntry
from events import Acceptor, Event, EventRejected, RejectReason, curve_public_key_from_peer_id, parse_event, verify_event
from events.model import UnknownBody


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Size limits a receiver enforces; both nodes of a call must agree on them."""

    max_tensor_bytes: int = MAX_TENSOR_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES


@dataclass(frozen=True, slots=True)
class Expectations:
    """What a message must match: the accepted record types, the request, the author."""

    accepts: tuple[type, ...]
    is_known_request: Callable[[str], bool]
    authenticated_key: str | None = None
    author: str | None = None
    request_id: str | None = None
    input_ids: tuple[str, ...] | None = None


@functools.lru_cache(maxsize=4096)
def curve_key_text(peer_id: str) -> str:
    """Return the Z85 CurveZMQ public key of a peer id, as text."""
    return curve_public_key_from_peer_id(peer_id).decode("ascii")


def receive_records(
    header: Header,
    parts: Sequence[zmq.Frame],
    expect: Expectations,
    limits: FrameLimits,
    acceptor: Acceptor | None,
    pool: BufferPool,
) -> list[ReceivedTensor]:
    """Check the records and chunks after a header and return the tensors; raise FrameRejected."""
    records = split_records(header, parts)
    decoded = [_decode_record(event_part, chunks, expect, limits) for event_part, chunks in records]
    events = [event for event, _entries in decoded]
    total = sum(event.body.nbytes for event in events)
    if total > limits.max_message_bytes:
        raise FrameRejected(
            FrameReason.OVERSIZED,
            f"message of {total} tensor bytes exceeds the limit of {limits.max_message_bytes} bytes "
            "(MAX_MESSAGE_BYTES); split the batch into smaller calls",
        )
    _check_origin(events, [entry.name for _event, entries in decoded for entry in entries], expect)
    try:
        _check_signatures(events, acceptor)
        for event, (_event_part, chunks) in zip(events, records):
            try:
                check_digest(event.body, chunks)
            except FrameRejected as rejection:
                # The record passed the signature check; it is stored when an acceptor is wired.
                rejection.evidence = (event.id,) if acceptor is not None else ()
                raise
    except FrameRejected as rejection:
        # The author matched the authenticated connection or the called peer, so the sender is known.
        rejection.peer_id = events[0].author
        raise
    received: list[ReceivedTensor] = []
    for (event, entries), (_event_part, chunks) in zip(decoded, records):
        tensors = assemble_entries(entries, chunks, pool)
        received.extend(ReceivedTensor(entry.name, tensor, event, entry.fields) for entry, tensor in zip(entries, tensors))
    return received


def _decode_record(
    event_part: zmq.Frame, chunks: list[zmq.Frame], expect: Expectations, limits: FrameLimits
) -> tuple[Event, list[TensorEntry]]:
    try:
        event = parse_event(event_part.bytes)
    except EventRejected as rejection:
        reason = FrameReason.OVERSIZED if rejection.reason is RejectReason.OVERSIZED else FrameReason.MALFORMED_EVENT
        raise FrameRejected(reason, f"record event rejected: {rejection}") from None
    if isinstance(event.body, UnknownBody):
        raise FrameRejected(
            FrameReason.UNKNOWN_RECORD_TYPE,
            f"record type {event.type} {event.body.version} is not known to this node; "
            "the sender runs a newer version: upgrade this node",
        )
    if not isinstance(event.body, expect.accepts):
        names = sorted(accepted.__name__ for accepted in expect.accepts)
        raise FrameRejected(FrameReason.UNEXPECTED_TYPE, f"record is a {event.type} event; expected one of {names}")
    return event, check_tensor(event.body, chunks, limits.max_tensor_bytes)


def _check_origin(events: list[Event], names: list[str], expect: Expectations) -> None:
    first = events[0]
    request_id = first.refs[0] if first.refs else None
    for event in events:
        if not event.refs or event.refs[0] != request_id or event.author != first.author:
            raise FrameRejected(
                FrameReason.MALFORMED,
                "every record of one message needs the same author and the same request id as its first ref",
            )
    if len(set(names)) != len(names):
        raise FrameRejected(FrameReason.MALFORMED, f"tensor names {names} repeat; each tensor of a message needs its own name")
    if expect.authenticated_key is not None:
        if curve_key_text(first.author) != expect.authenticated_key:
            raise FrameRejected(
                FrameReason.AUTHOR_MISMATCH,
                f"records are signed by {first.author}, but the connection is authenticated with "
                f"CurveZMQ key {expect.authenticated_key}, which is not that peer's key",
            )
    if expect.author is not None and first.author != expect.author:
        raise FrameRejected(
            FrameReason.AUTHOR_MISMATCH, f"reply records are signed by {first.author}, but the call went to {expect.author}"
        )
    if request_id is None or (expect.request_id is not None and request_id != expect.request_id):
        raise FrameRejected(
            FrameReason.UNKNOWN_REQUEST, f"reply records belong to request {request_id}, not to {expect.request_id}"
        )
    for event in events:
        if expect.input_ids is not None and event.refs[1:] != expect.input_ids:
            raise FrameRejected(
                FrameReason.UNLINKED_REPLY,
                f"reply record {event.id} references {list(event.refs[1:])}, "
                f"not the call's input records {list(expect.input_ids)}",
                peer_id=first.author,
            )
    if not expect.is_known_request(request_id):
        raise FrameRejected(
            FrameReason.UNKNOWN_REQUEST, f"request {request_id} is not known to this node", peer_id=first.author
        )


def _check_signatures(events: list[Event], acceptor: Acceptor | None) -> None:
    if acceptor is None:
        for event in events:
            try:
                verify_event(event)
            except EventRejected as rejection:
                raise FrameRejected(FrameReason.BAD_SIGNATURE, str(rejection)) from None
        return
    result = acceptor.accept_decoded_later(events)
    if result.rejected:
        first = result.rejected[0][1]
        reason = FrameReason.BAD_SIGNATURE if first.reason is RejectReason.BAD_SIGNATURE else FrameReason.MALFORMED_EVENT
        raise FrameRejected(reason, f"record event rejected by the log: {first}")
