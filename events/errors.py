"""Errors raised by the event core: identity, codec, acceptance and log store."""

from __future__ import annotations

import enum


class EventError(Exception):
    """Base class of every error the `events` package raises."""


class IdentityError(EventError):
    """A node key file or a peer id cannot be used."""


class KeyFilePermissionError(IdentityError):
    """A private key file is readable or writable by group or others."""


class InvalidPeerId(IdentityError):
    """A string is not the peer id of an Ed25519 key (identity multihash, base58btc)."""


class SchemaError(EventError):
    """An event type definition or registration is invalid."""


class RejectReason(enum.Enum):
    """Reason an incoming event was rejected. The value is the counter name."""

    BAD_SIGNATURE = "bad_signature"
    INVALID_AUTHOR = "invalid_author"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNKNOWN_FIELD = "unknown_field"
    INCOMPATIBLE_VERSION = "incompatible_version"
    OWN_IDENTITY_CONFLICT = "own_identity_conflict"


class EventRejected(EventError):
    """An event failed an acceptance check; `reason` names the check."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


class LogStoreError(EventError):
    """The log store cannot be opened or written."""


class ReducerError(EventError):
    """A view was given an event type that its reducer was not taught."""
