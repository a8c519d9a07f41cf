"""Event core: identity, event types, wire codec, acceptance path, log store and views.

Importing `events` registers the membership and shard event types. See docs/events.md for
the public API and the wire and log formats.
"""

from events.acceptance import AcceptResult, Acceptor
from events.codec import MAX_PAYLOAD_BYTES, Event, decode_event, event_id, parse_event, sign_event, verify_event
from events.errors import (
    EventError,
    EventRejected,
    IdentityError,
    InvalidPeerId,
    KeyFilePermissionError,
    LogStoreError,
    ReducerError,
    RejectReason,
    SchemaError,
)
from events.identity import Identity, curve_public_key_from_peer_id, peer_id_from_public_key, public_key_from_peer_id
from events.membership import PeerHeartbeat, PeerJoined, PeerLeft, SequenceSkipped
from events.model import REQUEST_SCOPE, SCHEMA_MAJOR, SWARM_SCOPE, UnknownBody, event_type, registered_types, scope_of
from events.shards import Fragment, ShardClaimed, ShardLoaded, ShardReleased, parse_fragment
from events.store import Equivocation, LogStore, SeqReservation, request_reservation_key
from events.views import Dispatcher, Projection, Reducer
from events.writer import LAMPORT_RESERVATION_BLOCK, SEQ_RESERVATION_BLOCK, EventWriter, current_boot_id, wall_clock_ms

__all__ = [
    "LAMPORT_RESERVATION_BLOCK",
    "MAX_PAYLOAD_BYTES",
    "REQUEST_SCOPE",
    "SCHEMA_MAJOR",
    "SWARM_SCOPE",
    "SEQ_RESERVATION_BLOCK",
    "AcceptResult",
    "Acceptor",
    "Dispatcher",
    "Equivocation",
    "Event",
    "EventError",
    "EventRejected",
    "EventWriter",
    "Fragment",
    "Identity",
    "IdentityError",
    "InvalidPeerId",
    "KeyFilePermissionError",
    "LogStore",
    "LogStoreError",
    "PeerHeartbeat",
    "PeerJoined",
    "PeerLeft",
    "Projection",
    "Reducer",
    "ReducerError",
    "RejectReason",
    "SchemaError",
    "SeqReservation",
    "SequenceSkipped",
    "ShardClaimed",
    "ShardLoaded",
    "ShardReleased",
    "UnknownBody",
    "curve_public_key_from_peer_id",
    "current_boot_id",
    "decode_event",
    "event_id",
    "event_type",
    "parse_event",
    "parse_fragment",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "registered_types",
    "request_reservation_key",
    "scope_of",
    "sign_event",
    "verify_event",
    "wall_clock_ms",
]
