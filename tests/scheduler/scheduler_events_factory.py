"""Signed request events for Scheduler view tests, with fixed identities per role."""

from __future__ import annotations

import secrets
from typing import Any

from cortex.privacy import seal, seal_json
from cortex.scheduler import (
    RequestAccepted,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
    plan_digest,
    request_id_for,
)
from events import Event, Identity, sign_event

SUBMITTER = Identity.generate()
DRIVER = Identity.generate()
TAKEOVER = Identity.generate()
OUTSIDER = Identity.generate()
HOLDER_A = Identity.generate()
HOLDER_B = Identity.generate()
HOLDER_C = Identity.generate()

SEALED_PROMPT = seal(b"Tell me a story", [SUBMITTER.peer_id, DRIVER.peer_id, TAKEOVER.peer_id])
SEALED_TOKENS = seal_json({"token_ids": [11, 12], "text": " once"}, [SUBMITTER.peer_id, DRIVER.peer_id])
RECORDS_DIGEST = "00" * 32


def signed(identity: Identity, body: Any, seq: int, lamport: int | None = None, time_ms: int = 1_000) -> Event:
    return sign_event(identity, body, seq=seq, lamport=lamport or seq, time_ms=time_ms)


def submission(max_tokens: int = 16, deadline_ms: int = 0, model_id: str = "model-1", nonce: str = "") -> RequestSubmitted:
    return RequestSubmitted(
        nonce or secrets.token_hex(16), model_id, max_tokens, 15, sealed_prompt=SEALED_PROMPT, deadline_ms=deadline_ms
    )


def request_id_of(event: Event) -> str:
    """Return the request id of a signed RequestSubmitted event."""
    return request_id_for(event.author, event.body.nonce)


def acceptance(request_id: str, route: dict[str, str], kv_bytes: int = 100, takeover_of: str = "") -> RequestAccepted:
    reservations = dict.fromkeys(route, kv_bytes)
    return RequestAccepted(request_id, route, reservations, 4, plan_digest(route, reservations, 4), takeover_of)


def replan(request_id: str, failed: str, route: dict[str, str], kv_bytes: int = 100, resume_step: int = 2) -> RouteReplanned:
    reservations = dict.fromkeys(route, kv_bytes)
    return RouteReplanned(
        request_id, failed, "holder_failed", route, reservations, 4, plan_digest(route, reservations, 4), resume_step
    )


def tokens(request_id: str, start: int, stop: int) -> TokenGenerated:
    return TokenGenerated(request_id, start, stop, SEALED_TOKENS)


def completion(request_id: str, completion_tokens: int = 4, degraded_reason: str = "") -> RequestCompleted:
    return RequestCompleted(
        request_id,
        4,
        completion_tokens,
        "length",
        {"prefill": 3, "decode": 9, "total": 12},
        RECORDS_DIGEST,
        0,
        degraded=bool(degraded_reason),
        degraded_reason=degraded_reason,
    )


def failure(request_id: str, code: str = "holder_failed") -> RequestFailed:
    return RequestFailed(request_id, code, f"failed: {code}")


def cancellation(request_id: str) -> RequestCancelled:
    return RequestCancelled(request_id, "user pressed stop")
