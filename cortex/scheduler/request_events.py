"""Request lifecycle events: family `requests`, gossiped to the whole swarm.

A request id is BLAKE2b-256 of the submitter's peer id, a newline and the random `nonce` in
its `RequestSubmitted` (`request_id_for`). The submitter computes the id before it signs,
so it can compute the driver from the id and seal the prompt to that driver. Every later event of
the request carries the id in `request_id`, and its refs name the `RequestSubmitted` event.
The submitter is the author of `RequestSubmitted`; the driver is the author of
`RequestAccepted`. Content fields (`sealed_*`) hold `cortex.privacy` sealed text that only
the submitter and the driver can open; everything else is metadata every peer reads.

No floats: sampling settings are integers in fixed units (temperature in thousandths,
top-p in millionths), times are integer milliseconds. docs/scheduler.md lists every field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from cortex.privacy import sealed_plaintext_size
from events.errors import InvalidPeerId
from events.identity import public_key_from_peer_id
from events.model import event_type
from events.shards import parse_fragment

REQUESTS = "requests"

TEMPERATURE_SCALE = 1_000  # temperature_milli / 1000 is the sampling temperature
TOP_P_SCALE = 1_000_000  # top_p_micro / 1_000_000 is top-p
MAX_REDUNDANCY = 8
MAX_TOKENS_PER_EVENT = 1_024
MAX_STOP_STRINGS = 16

# Reason codes of RequestFailed; a newer node may publish codes not listed here.
KV_BUDGET_EXCEEDED = "kv_budget_exceeded"
NO_HEAD_HOLDER = "no_head_holder"
BLOCK_RANGE_UNCOVERED = "block_range_uncovered"
INVALID_ROUTE = "invalid_route"
INVALID_REQUEST = "invalid_request"
DEADLINE_EXCEEDED = "deadline_exceeded"
HOLDER_FAILED = "holder_failed"
DRIVER_STOPPED = "driver_stopped"
NO_QUORUM = "no_quorum"  # the replicas of an expert call formed no strict majority (cortex.quorum)
INTERNAL_ERROR = "internal_error"

_HEX_ID = re.compile(r"[0-9a-f]{64}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")


def _check_request_id(request_id: str) -> None:
    if not _HEX_ID.fullmatch(request_id):
        raise ValueError(f"request_id {request_id!r:.80} is not 64 lowercase hex digits")


def _check_peer_id(peer_id: str, name: str) -> None:
    try:
        public_key_from_peer_id(peer_id)
    except InvalidPeerId as error:
        raise ValueError(f"{name}: {error}") from None


def _check_non_negative(value: int, name: str) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_code(code: str, name: str) -> None:
    if not _CODE.fullmatch(code):
        raise ValueError(f"{name} {code!r:.80} must be lowercase snake_case matching {_CODE.pattern}")


def _check_sealed(sealed: str, name: str) -> None:
    try:
        sealed_plaintext_size(sealed)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def check_route(route: Mapping[str, str], kv_reservations: Mapping[str, int]) -> None:
    """Raise ValueError unless `route` maps block fragments that chain from layer 0 without gaps.

    An empty route is valid: the driver generates without block holders (degraded mode).
    `kv_reservations` must name the same fragments, with byte counts >= 0.
    """
    blocks = []
    for fragment, holder in route.items():
        parsed = parse_fragment(fragment)
        if parsed.kind != "block":
            raise ValueError(f"route fragment {fragment!r} is not a block[a:b] fragment")
        _check_peer_id(holder, f"holder of {fragment}")
        blocks.append(parsed)
    blocks.sort(key=lambda block: block.start)
    next_layer = 0
    for block in blocks:
        if block.start != next_layer:
            raise ValueError(f"route fragment {block} starts at layer {block.start}, expected layer {next_layer}")
        next_layer = block.stop
    if set(kv_reservations) != set(route):
        raise ValueError(
            f"kv_reservations names {sorted(kv_reservations)} but the route names {sorted(route)}; they must match"
        )
    for fragment, reserved in kv_reservations.items():
        _check_non_negative(reserved, f"kv_reservations[{fragment}]")


def request_id_for(submitter: str, nonce: str) -> str:
    """Return the id of the request that `submitter` submitted with `nonce`."""
    return hashlib.blake2b(f"{submitter}\n{nonce}".encode(), digest_size=32).hexdigest()


def plan_digest(route: Mapping[str, str], kv_reservations: Mapping[str, int], prompt_tokens: int) -> str:
    """Return the BLAKE2b-256 hex digest of a plan: canonical JSON of route, reservations and prompt tokens."""
    plan = {"kv_reservations": dict(kv_reservations), "prompt_tokens": prompt_tokens, "route": dict(route)}
    return hashlib.blake2b(orjson.dumps(plan, option=orjson.OPT_SORT_KEYS), digest_size=32).hexdigest()


def records_digest(event_ids: Iterable[str]) -> tuple[str, int]:
    """Return (digest, count) of a request's request-scoped records, named by event id.

    The digest is BLAKE2b-256 over the sorted, distinct ids, each followed by a newline, so
    it does not depend on the order the records arrived in.
    """
    unique = sorted(set(event_ids))
    for event_id in unique:
        if not _HEX_ID.fullmatch(event_id):
            raise ValueError(f"record id {event_id!r:.80} is not an event id (64 lowercase hex digits)")
    text = "".join(f"{event_id}\n" for event_id in unique)
    return hashlib.blake2b(text.encode("ascii"), digest_size=32).hexdigest(), len(unique)


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class RequestSubmitted:
    """A request for text from `model_id`; the author is the submitter.

    `nonce` is 16 random bytes as 32 lowercase hex digits, which with the author gives the
    request id (`request_id_for`). Exactly one of `sealed_prompt` (sealed UTF-8 text) and `prompt_digest` (BLAKE2b-256 hex
    of the sealed prompt text, which goes to the driver over the data plane) is set.
    """

    nonce: str
    model_id: str
    max_tokens: int
    prompt_bytes: int
    sealed_prompt: str = ""
    prompt_digest: str = ""
    sealed_stop: str = ""
    temperature_milli: int = 0
    top_p_micro: int = TOP_P_SCALE
    seed: int | None = None
    deadline_ms: int = 0
    redundancy: int = 1

    def __post_init__(self) -> None:
        if not _NONCE.fullmatch(self.nonce):
            raise ValueError(f"nonce {self.nonce!r:.80} is not 32 lowercase hex digits")
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        _check_non_negative(self.prompt_bytes, "prompt_bytes")
        if bool(self.sealed_prompt) == bool(self.prompt_digest):
            raise ValueError("set exactly one of sealed_prompt and prompt_digest")
        if self.sealed_prompt:
            _check_sealed(self.sealed_prompt, "sealed_prompt")
        elif not _HEX_ID.fullmatch(self.prompt_digest):
            raise ValueError(f"prompt_digest {self.prompt_digest!r:.80} is not 64 lowercase hex digits")
        if self.sealed_stop:
            _check_sealed(self.sealed_stop, "sealed_stop")
        _check_non_negative(self.temperature_milli, "temperature_milli")
        if not 0 < self.top_p_micro <= TOP_P_SCALE:
            raise ValueError(f"top_p_micro must be in 1..{TOP_P_SCALE}, got {self.top_p_micro}")
        if self.seed is not None:
            _check_non_negative(self.seed, "seed")
        _check_non_negative(self.deadline_ms, "deadline_ms")
        if not 1 <= self.redundancy <= MAX_REDUNDANCY:
            raise ValueError(f"redundancy must be in 1..{MAX_REDUNDANCY}, got {self.redundancy}")

    @property
    def temperature(self) -> float:
        """The sampling temperature (0 is greedy)."""
        return self.temperature_milli / TEMPERATURE_SCALE

    @property
    def top_p(self) -> float:
        """The top-p share of probability mass, in (0, 1]."""
        return self.top_p_micro / TOP_P_SCALE


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class RequestAccepted:
    """The author drives the request along `route` (block fragment -> holder peer id).

    `kv_reservations` is the KV-cache bytes each route fragment's holder reserves for the
    request; `plan_digest` is `plan_digest(route, kv_reservations, prompt_tokens)`.
    `takeover_of` names the previous driver when this driver took the request over.
    """

    request_id: str
    route: dict[str, str]
    kv_reservations: dict[str, int]
    prompt_tokens: int
    plan_digest: str
    takeover_of: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        check_route(self.route, self.kv_reservations)
        _check_non_negative(self.prompt_tokens, "prompt_tokens")
        expected = plan_digest(self.route, self.kv_reservations, self.prompt_tokens)
        if self.plan_digest != expected:
            raise ValueError(f"plan_digest {self.plan_digest!r:.80} does not match the plan, whose digest is {expected}")
        if self.takeover_of:
            _check_peer_id(self.takeover_of, "takeover_of")


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class TokenGenerated:
    """Tokens at positions `step_start` to `step_stop - 1` of the output, sealed.

    `sealed_tokens` opens to JSON `{"token_ids": [int, ...], "text": str, "text_ends": [int, ...]}`
    with `step_stop - step_start` token ids, the text they add, and where each token's text
    ends in it (`text_ends`, absent in batches of drivers before it existed).
    """

    request_id: str
    step_start: int
    step_stop: int
    sealed_tokens: str

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_non_negative(self.step_start, "step_start")
        count = self.step_stop - self.step_start
        if not 1 <= count <= MAX_TOKENS_PER_EVENT:
            raise ValueError(
                f"steps {self.step_start} to {self.step_stop} hold {count} tokens; "
                f"one event carries 1 to {MAX_TOKENS_PER_EVENT}"
            )
        _check_sealed(self.sealed_tokens, "sealed_tokens")


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class RequestCompleted:
    """The request finished: usage, per-phase timings, and the digest of its request-scoped records.

    `timings_ms` maps a phase name (`admission`, `prefill`, `decode`, `total`, ...) to ms.
    `degraded` is set when the output did not come from the swarm (say, a local fallback
    model), and `degraded_reason` then gives the reason.
    """

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    timings_ms: dict[str, int]
    records_digest: str
    records_count: int
    degraded: bool = False
    degraded_reason: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_non_negative(self.prompt_tokens, "prompt_tokens")
        _check_non_negative(self.completion_tokens, "completion_tokens")
        _check_code(self.finish_reason, "finish_reason")
        for phase, milliseconds in self.timings_ms.items():
            _check_code(phase, "timings_ms phase")
            _check_non_negative(milliseconds, f"timings_ms[{phase}]")
        if not _HEX_ID.fullmatch(self.records_digest):
            raise ValueError(f"records_digest {self.records_digest!r:.80} is not 64 lowercase hex digits")
        _check_non_negative(self.records_count, "records_count")
        if self.degraded != bool(self.degraded_reason):
            raise ValueError("degraded_reason must be set exactly when degraded is true")


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The request ended without output; `reason_code` is machine-readable, `message` for people.

    `details` carries the numbers behind the message (bytes needed and free, say). Neither
    `message` nor `details` may quote the prompt or generated text.
    """

    request_id: str
    reason_code: str
    message: str
    details: dict[str, int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_code(self.reason_code, "reason_code")


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The submitter withdrew the request; the driver stops and releases its reservations."""

    request_id: str
    reason: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@event_type(version="1.0", family=REQUESTS)
@dataclass(frozen=True, slots=True)
class RouteReplanned:
    """The driver replaced `failed_holder` on the route; `route` is the whole new route.

    `reason` is a code (`holder_failed`, `holder_timed_out`, ...). Generation resumes at
    output position `resume_step` after the new holders replayed the session's inputs.
    """

    request_id: str
    failed_holder: str
    reason: str
    route: dict[str, str]
    kv_reservations: dict[str, int]
    prompt_tokens: int
    plan_digest: str
    resume_step: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_peer_id(self.failed_holder, "failed_holder")
        _check_code(self.reason, "reason")
        check_route(self.route, self.kv_reservations)
        if not self.route:
            raise ValueError("a replanned route must not be empty")
        if self.failed_holder in self.route.values():
            raise ValueError(f"the replanned route still uses the failed holder {self.failed_holder}")
        _check_non_negative(self.prompt_tokens, "prompt_tokens")
        expected = plan_digest(self.route, self.kv_reservations, self.prompt_tokens)
        if self.plan_digest != expected:
            raise ValueError(f"plan_digest {self.plan_digest!r:.80} does not match the plan, whose digest is {expected}")
        _check_non_negative(self.resume_step, "resume_step")
