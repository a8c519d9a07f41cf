"""Helpers that craft signed envelopes, valid or not, for event core tests."""

from __future__ import annotations

from typing import Any

import orjson

from events import Identity


def sign_envelope(identity: Identity, envelope: dict[str, Any]) -> bytes:
    """Sign an arbitrary envelope as canonical JSON, so tests can craft invalid but signed events."""
    payload = orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)
    return payload + identity.sign(payload)


def envelope_for(identity: Identity, **overrides: Any) -> dict[str, Any]:
    """Return a valid ShardLoaded envelope by `identity`, with fields overridden."""
    envelope: dict[str, Any] = {
        "author": identity.peer_id,
        "body": {"model_id": "m", "fragment": "head", "memory_bytes": 10},
        "lamport": 1,
        "refs": [],
        "seq": 1,
        "time_ms": 1_000,
        "type": "ShardLoaded",
        "version": "1.0",
    }
    envelope.update(overrides)
    return envelope
