"""Hypothesis strategies and fixed identities for the request event types."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

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
)
from events import Identity

PEERS = [Identity.generate() for _ in range(4)]
PEER_IDS = [identity.peer_id for identity in PEERS]

# Sealing draws random keys, so a fixed pool keeps the strategies reproducible.
SEALED_TEXTS = [
    seal(b"", PEER_IDS[:1]),
    seal("a prompt with \u00fcnicode".encode(), PEER_IDS[:2]),
    seal(b"x" * 3_000, PEER_IDS[1:3]),
]
SEALED_TOKENS = [seal_json({"token_ids": [5, 6], "text": " hi"}, PEER_IDS[:2])]

HEX_IDS = st.binary(min_size=32, max_size=32).map(bytes.hex)
NON_NEGATIVE = st.integers(min_value=0, max_value=2**62)
CODES = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
SEALED = st.sampled_from(SEALED_TEXTS)
PEER = st.sampled_from(PEER_IDS)


@st.composite
def routes(
    draw: st.DrawFn, min_blocks: int = 0, holders: st.SearchStrategy[str] = PEER
) -> tuple[dict[str, str], dict[str, int]]:
    """Draw a route of chained blocks from layer 0 and its KV reservations."""
    cuts = draw(st.lists(st.integers(min_value=1, max_value=60), min_size=min_blocks, max_size=4, unique=True))
    bounds = [0, *sorted(cuts)]
    route: dict[str, str] = {}
    reservations: dict[str, int] = {}
    for start, stop in zip(bounds, bounds[1:], strict=False):
        fragment = f"block[{start}:{stop}]"
        route[fragment] = draw(holders)
        reservations[fragment] = draw(NON_NEGATIVE)
    return route, reservations


@st.composite
def submitted(draw: st.DrawFn) -> RequestSubmitted:
    inline = draw(st.booleans())
    return RequestSubmitted(
        nonce=draw(st.binary(min_size=16, max_size=16).map(bytes.hex)),
        model_id=draw(st.text(min_size=1, max_size=64)),
        max_tokens=draw(st.integers(min_value=1, max_value=2**31)),
        prompt_bytes=draw(NON_NEGATIVE),
        sealed_prompt=draw(SEALED) if inline else "",
        prompt_digest="" if inline else draw(HEX_IDS),
        sealed_stop=draw(st.one_of(st.just(""), SEALED)),
        temperature_milli=draw(st.integers(min_value=0, max_value=10_000)),
        top_p_micro=draw(st.integers(min_value=1, max_value=1_000_000)),
        seed=draw(st.one_of(st.none(), NON_NEGATIVE)),
        deadline_ms=draw(NON_NEGATIVE),
        redundancy=draw(st.integers(min_value=1, max_value=8)),
    )


@st.composite
def accepted(draw: st.DrawFn) -> RequestAccepted:
    route, reservations = draw(routes())
    prompt_tokens = draw(NON_NEGATIVE)
    return RequestAccepted(
        request_id=draw(HEX_IDS),
        route=route,
        kv_reservations=reservations,
        prompt_tokens=prompt_tokens,
        plan_digest=plan_digest(route, reservations, prompt_tokens),
        takeover_of=draw(st.one_of(st.just(""), PEER)),
    )


@st.composite
def replanned(draw: st.DrawFn) -> RouteReplanned:
    route, reservations = draw(routes(min_blocks=1, holders=st.sampled_from(PEER_IDS[1:])))
    prompt_tokens = draw(NON_NEGATIVE)
    return RouteReplanned(
        request_id=draw(HEX_IDS),
        failed_holder=PEER_IDS[0],
        reason=draw(CODES),
        route=route,
        kv_reservations=reservations,
        prompt_tokens=prompt_tokens,
        plan_digest=plan_digest(route, reservations, prompt_tokens),
        resume_step=draw(NON_NEGATIVE),
    )


@st.composite
def token_batches(draw: st.DrawFn) -> TokenGenerated:
    start = draw(NON_NEGATIVE)
    return TokenGenerated(draw(HEX_IDS), start, start + draw(st.integers(min_value=1, max_value=1_024)), SEALED_TOKENS[0])


@st.composite
def completed(draw: st.DrawFn) -> RequestCompleted:
    degraded = draw(st.booleans())
    return RequestCompleted(
        request_id=draw(HEX_IDS),
        prompt_tokens=draw(NON_NEGATIVE),
        completion_tokens=draw(NON_NEGATIVE),
        finish_reason=draw(CODES),
        timings_ms=draw(st.dictionaries(CODES, NON_NEGATIVE, max_size=4)),
        records_digest=draw(HEX_IDS),
        records_count=draw(NON_NEGATIVE),
        degraded=degraded,
        degraded_reason=draw(st.text(min_size=1, max_size=40)) if degraded else "",
    )


BODY_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    RequestSubmitted: submitted(),
    RequestAccepted: accepted(),
    TokenGenerated: token_batches(),
    RequestCompleted: completed(),
    RequestFailed: st.builds(
        RequestFailed,
        request_id=HEX_IDS,
        reason_code=CODES,
        message=st.text(max_size=80),
        details=st.dictionaries(st.text(max_size=10), st.one_of(NON_NEGATIVE, st.text(max_size=10)), max_size=3),
    ),
    RequestCancelled: st.builds(RequestCancelled, request_id=HEX_IDS, reason=st.text(max_size=40)),
    RouteReplanned: replanned(),
}
