"""Event wire format: signed canonical JSON payload followed by a 64-byte Ed25519 signature.

Wire bytes of one event:

    payload || signature          signature = Ed25519(author key, payload), 64 bytes

The payload is a JSON object serialized by orjson with sorted keys (`OPT_SORT_KEYS`): UTF-8,
no whitespace, keys sorted at every level, no floats. It has exactly these fields:

    author    str    libp2p peer id of an Ed25519 key (12D3KooW...); the verifying key
    body      object the fields of the event type
    lamport   int    Lamport clock, >= 1
    refs      array  ids (64 lowercase hex digits) of the events this one depends on
    seq       int    per-author sequence number, 1, 2, 3, ... with no reuse
    time_ms   int    author's wall clock in ms since the Unix epoch (informational only)
    type      str    registered type name, such as "PeerJoined"
    version   str    the type's schema version "MAJOR.MINOR"

Integers are in [0, 2**63). The payload is at most MAX_PAYLOAD_BYTES (64 KiB).

The event id is BLAKE2b-256 of the payload, the bytes that were signed, written as 64
lowercase hex digits. The signature is not part of the id: libsodium accepts one
canonical signature encoding, and a signer that randomizes its nonce would otherwise give
one event two ids, which would look like equivocation.

A receiver verifies the signature over the payload bytes it received, never over a
re-serialization. It also checks that the payload is canonical (re-serializing the decoded
object gives the same bytes), so every event has exactly one byte form and one id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import orjson

from events.errors import EventRejected, InvalidPeerId, RejectReason
from events.identity import SIGNATURE_BYTES, Identity, public_key_from_peer_id
from events.model import (
    SCHEMA_MAJOR,
    SchemaError,
    SchemaViolation,
    UnknownBody,
    UnknownFieldError,
    is_valid_type_name,
    parse_version,
    registered_type_of_class,
    reject_floats,
    type_by_name,
    type_of,
)

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_INT = 2**63 - 1

_ENVELOPE_KEYS = frozenset({"author", "body", "lamport", "refs", "seq", "time_ms", "type", "version"})
_EVENT_ID_PATTERN = re.compile(r"[0-9a-f]{64}")
_SORT_KEYS = orjson.OPT_SORT_KEYS


@dataclass(frozen=True, slots=True)
class Event:
    """A signed event: envelope fields, the typed body, and the exact wire bytes."""

    id: str
    type: str
    version: str
    author: str
    seq: int
    lamport: int
    time_ms: int
    refs: tuple[str, ...]
    body: Any
    wire: bytes

    @property
    def payload(self) -> bytes:
        return self.wire[:-SIGNATURE_BYTES]

    @property
    def signature(self) -> bytes:
        return self.wire[-SIGNATURE_BYTES:]

    @property
    def is_known_type(self) -> bool:
        """Whether the event's type is registered here (False for a newer node's new type)."""
        return not isinstance(self.body, UnknownBody)


def event_id(payload: bytes) -> str:
    """Return the id of the event with this payload: BLAKE2b-256 as 64 hex digits."""
    return hashlib.blake2b(payload, digest_size=32).hexdigest()


def sign_event(
    identity: Identity,
    body: Any,
    *,
    seq: int,
    lamport: int,
    time_ms: int,
    refs: tuple[str, ...] = (),
) -> Event:
    """Serialize and sign an event body; return the Event with its wire bytes.

    Raises SchemaError for an unregistered body class, SchemaViolation for a field value
    that does not fit its type (a float, for example), and EventRejected(OVERSIZED) for a
    payload over MAX_PAYLOAD_BYTES. Nodes publish their own events through `EventWriter`,
    which picks seq and lamport; call this directly only in tools and tests.
    """
    registered = type_of(body)
    for name, value in (("seq", seq), ("lamport", lamport), ("time_ms", time_ms)):
        if type(value) is not int or not 0 <= value <= MAX_INT:
            raise SchemaViolation(f"{name} must be an int in [0, 2**63), got {value!r}")
    if registered.check_envelope is not None:
        try:
            registered.check_envelope(body, identity.peer_id, seq)
        except ValueError as error:
            raise SchemaViolation(f"invalid {registered.name}: {error}") from None
    refs = tuple(refs)
    for ref in refs:
        if not isinstance(ref, str) or not _EVENT_ID_PATTERN.fullmatch(ref):
            raise SchemaViolation(f"ref {ref!r} is not an event id (64 lowercase hex digits)")
    envelope = {
        "author": identity.peer_id,
        "body": registered.body_to_json(body),
        "lamport": lamport,
        "refs": refs,
        "seq": seq,
        "time_ms": time_ms,
        "type": registered.name,
        "version": registered.version,
    }
    payload = orjson.dumps(envelope, option=_SORT_KEYS)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise EventRejected(
            RejectReason.OVERSIZED,
            f"{registered.name} payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes; "
            "send large content over the data plane and reference it by digest",
        )
    wire = payload + identity.sign(payload)
    return Event(
        event_id(payload), registered.name, registered.version, identity.peer_id, seq, lamport, time_ms, refs, body, wire
    )


def decode_event(wire: bytes) -> Event:
    """Check and decode wire bytes, signature included; raise EventRejected with the reason."""
    event = parse_event(wire)
    verify_event(event)
    return event


def verify_event(event: Event) -> None:
    """Check the Ed25519 signature over the received payload; raise EventRejected(BAD_SIGNATURE)."""
    wire = event.wire
    try:
        nacl.bindings.crypto_sign_open(wire[-SIGNATURE_BYTES:] + wire[:-SIGNATURE_BYTES], public_key_from_peer_id(event.author))
    except nacl.exceptions.BadSignatureError:
        raise EventRejected(
            RejectReason.BAD_SIGNATURE,
            f"{event.type} seq {event.seq} from {event.author} has a signature that does not verify "
            "over the received payload",
        ) from None


def parse_event(wire: bytes) -> Event:
    """Decode and check everything but the signature: size, JSON, envelope, version, author, body.

    The acceptance path calls this first and `verify_event` second, so a duplicate can be
    dropped before paying for signature verification.
    """
    if len(wire) > MAX_PAYLOAD_BYTES + SIGNATURE_BYTES:
        raise EventRejected(
            RejectReason.OVERSIZED,
            f"event of {len(wire) - SIGNATURE_BYTES} payload bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes",
        )
    if len(wire) <= SIGNATURE_BYTES + 2:
        raise EventRejected(RejectReason.MALFORMED, f"event of {len(wire)} bytes is shorter than a signature and a payload")
    payload = wire[:-SIGNATURE_BYTES]
    try:
        envelope = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise EventRejected(RejectReason.MALFORMED, f"payload is not valid JSON: {error}") from None
    if type(envelope) is not dict:
        raise EventRejected(RejectReason.MALFORMED, f"payload is a JSON {type(envelope).__name__}, not an object")
    if envelope.keys() != _ENVELOPE_KEYS:
        _reject_envelope_keys(envelope)
    if orjson.dumps(envelope, option=_SORT_KEYS) != payload:
        raise EventRejected(
            RejectReason.MALFORMED, "payload is not canonical JSON (orjson, sorted keys, no whitespace)"
        )
    return _build_event(envelope, payload, wire)


def _build_event(envelope: dict[str, Any], payload: bytes, wire: bytes) -> Event:
    type_name, version, author = envelope["type"], envelope["version"], envelope["author"]
    seq, lamport, time_ms = envelope["seq"], envelope["lamport"], envelope["time_ms"]
    if type(type_name) is not str or not is_valid_type_name(type_name):
        raise EventRejected(RejectReason.MALFORMED, f"type {type_name!r:.80} is not a valid event type name")
    try:
        major, minor = _parse_version_cached(version)
    except SchemaError as error:
        raise EventRejected(RejectReason.MALFORMED, str(error)) from None
    if major != SCHEMA_MAJOR:
        raise EventRejected(
            RejectReason.INCOMPATIBLE_VERSION,
            f"{type_name} has schema version {version}, but this node reads major version {SCHEMA_MAJOR}; "
            "both nodes must run software with the same schema major",
        )
    for name, value, minimum in (("seq", seq, 1), ("lamport", lamport, 1), ("time_ms", time_ms, 0)):
        if type(value) is not int or not minimum <= value <= MAX_INT:
            raise EventRejected(RejectReason.MALFORMED, f"{name} must be an int in [{minimum}, 2**63), got {value!r:.80}")
    try:
        public_key_from_peer_id(author)
    except InvalidPeerId as error:
        raise EventRejected(RejectReason.INVALID_AUTHOR, str(error)) from None
    refs = _parse_refs(envelope["refs"])
    body = _parse_body(type_name, version, minor, envelope["body"])
    _check_envelope(body, author, seq)
    return Event(event_id(payload), type_name, version, author, seq, lamport, time_ms, refs, body, wire)


def _parse_refs(refs: Any) -> tuple[str, ...]:
    if type(refs) is not list:
        raise EventRejected(RejectReason.MALFORMED, f"refs must be an array of event ids, got {type(refs).__name__}")
    for ref in refs:
        if type(ref) is not str or not _EVENT_ID_PATTERN.fullmatch(ref):
            raise EventRejected(RejectReason.MALFORMED, f"ref {ref!r:.80} is not an event id (64 lowercase hex digits)")
    return tuple(refs)


def _parse_body(type_name: str, version: str, minor: int, fields: Any) -> Any:
    if type(fields) is not dict:
        raise EventRejected(RejectReason.MALFORMED, f"{type_name} body must be an object, got {type(fields).__name__}")
    registered = type_by_name(type_name)
    try:
        if registered is None:
            # A type from a newer minor version: stored and relayed, passed over by reducers.
            reject_floats(fields, type_name)
            return UnknownBody(type_name, version, fields)
        return registered.body_from_json(fields, allow_unknown=minor > registered.minor)
    except UnknownFieldError as error:
        raise EventRejected(RejectReason.UNKNOWN_FIELD, str(error)) from None
    except SchemaViolation as error:
        raise EventRejected(RejectReason.MALFORMED, str(error)) from None


def _check_envelope(body: Any, author: str, seq: int) -> None:
    registered = registered_type_of_class(type(body))
    if registered is None or registered.check_envelope is None:
        return
    try:
        registered.check_envelope(body, author, seq)
    except ValueError as error:
        raise EventRejected(RejectReason.MALFORMED, f"invalid {registered.name}: {error}") from None


def _reject_envelope_keys(envelope: dict[str, Any]) -> None:
    unknown = sorted(envelope.keys() - _ENVELOPE_KEYS)
    if unknown:
        raise EventRejected(
            RejectReason.UNKNOWN_FIELD, f"envelope has unknown field(s) {unknown}; known fields are {sorted(_ENVELOPE_KEYS)}"
        )
    missing = sorted(_ENVELOPE_KEYS - envelope.keys())
    raise EventRejected(RejectReason.MALFORMED, f"envelope is missing field(s) {missing}")


_VERSION_CACHE: dict[str, tuple[int, int]] = {}


def _parse_version_cached(version: Any) -> tuple[int, int]:
    parsed = _VERSION_CACHE.get(version) if type(version) is str else None
    if parsed is None:
        parsed = parse_version(version)
        if len(_VERSION_CACHE) < 1024:
            _VERSION_CACHE[version] = parsed
    return parsed
