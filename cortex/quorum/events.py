"""Quorum events: family `quorum`, gossiped to the whole swarm.

`QuorumVoted` is one voter's comparison of the outputs that replicas returned for the experts
of one MoE layer at one decoding step of one request. The outputs are listed flat: entry i
is the output of expert `experts[i]` computed by `producers[i]`, with BLAKE2b-256 digest
`digests[i]` and relative L2 distance `distances_nano[i]` (in billionths) to the reference
output of that expert's winning group. `NOT_FINITE` stands for an output with NaN or
infinity. An output agrees when its distance is at most `tolerance_nano`. A vote of a
spot check (a call sampled for a second replica, not a request with redundancy) records the
sampling probability in millionths and the seed, so replay can recompute which calls were
sampled (`cortex.quorum.policy.spot_checked`).

Version 1.1 adds `block` to votes and decisions: for a replicated block step it names the
block (`block[a:b]`), `layer` is the block's first layer, `step` the position of the step's
first token, and `experts` is 0 for every output. It is "" for expert outputs.

`QuorumDecided` is the outcome for that layer and step after every round of votes (a round
asks more replicas when the first ones did not form a quorum): the winning digest of each
expert, the producers that agreed on every expert they computed, and the producers that
dissented on at least one. Its refs name the request and the `QuorumVoted` events it rests on. The
`TrustReducer` (`cortex.quorum.trust`) folds trust from decisions.

`PeerPenalized` records that its author penalized `peer`, with a reason code and the ids of
the events that are the evidence. The router publishes it for a dissent (`disagreed`), the
node for an equivocation (`equivocated`), and the data plane for a rejected tensor frame
(`bad_frame`); other codes are allowed. Times are not recorded in bodies: the envelope has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from events.errors import InvalidPeerId
from events.identity import public_key_from_peer_id
from events.model import event_type

QUORUM = "quorum"

MAX_OUTPUTS = 256
MAX_EVIDENCE = 16
MAX_DETAIL_CHARS = 256
NANO = 1_000_000_000
PPM = 1_000_000
NOT_FINITE = 2**62  # distance of an output that has NaN or infinity in it

# Outcome codes of QuorumDecided.
AGREED = "agreed"
NO_QUORUM = "no_quorum"
OUTCOMES = (AGREED, NO_QUORUM)

# Reason codes of PeerPenalized published by Cortex; a newer node may publish other codes.
DISAGREED = "disagreed"
EQUIVOCATED = "equivocated"
FALSE_VOTE = "false_vote"
BAD_FRAME = "bad_frame"

_HEX_ID = re.compile(r"[0-9a-f]{64}")
_BLOCK = re.compile(r"block\[(\d{1,6}):(\d{1,6})\]")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")


def _check_hex(value: str, name: str) -> None:
    if not _HEX_ID.fullmatch(value):
        raise ValueError(f"{name} {value!r:.80} is not 64 lowercase hex digits")


def _check_peer_id(peer_id: str, name: str) -> None:
    try:
        public_key_from_peer_id(peer_id)
    except InvalidPeerId as error:
        raise ValueError(f"{name}: {error}") from None


def _check_non_negative(**values: int) -> None:
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")


def _check_code(code: str, name: str) -> None:
    if not _CODE.fullmatch(code):
        raise ValueError(f"{name} {code!r:.80} must be lowercase snake_case matching {_CODE.pattern}")


def _check_call(request_id: str, model_id: str, step: int, layer: int, block: str = "") -> None:
    _check_hex(request_id, "request_id")
    if not 0 < len(model_id) <= 128:
        raise ValueError(f"model_id {model_id!r:.80} must have 1 to 128 characters")
    _check_non_negative(step=step, layer=layer)
    if block:
        match = _BLOCK.fullmatch(block)
        if match is None or int(match.group(1)) != layer or int(match.group(2)) <= layer:
            raise ValueError(f"block {block!r:.40} must be block[{layer}:STOP] with STOP > {layer}, matching the layer")


@event_type(version="1.1", family=QUORUM)
@dataclass(frozen=True, slots=True)
class QuorumVoted:
    """One voter's distances between the outputs of one MoE layer's experts at one step."""

    request_id: str
    model_id: str
    step: int
    layer: int
    dtype: str
    tolerance_nano: int
    experts: tuple[int, ...]
    producers: tuple[str, ...]
    digests: tuple[str, ...]
    distances_nano: tuple[int, ...]
    spot_check_ppm: int = 0
    spot_check_seed: int = 0
    block: str = ""  # the block of a replicated block step (version 1.1); "" for expert outputs

    def __post_init__(self) -> None:
        _check_call(self.request_id, self.model_id, self.step, self.layer, self.block)
        if not 0 <= self.spot_check_ppm <= PPM:
            raise ValueError(f"spot_check_ppm must be in 0..{PPM}, got {self.spot_check_ppm}")
        if not 0 <= self.spot_check_seed < 2**63:
            raise ValueError(f"spot_check_seed must be in 0..2**63-1, got {self.spot_check_seed}")
        if not 0 < len(self.dtype) <= 16:
            raise ValueError(f"dtype {self.dtype!r:.40} must have 1 to 16 characters")
        _check_non_negative(tolerance_nano=self.tolerance_nano)
        count = len(self.experts)
        if not 0 < count <= MAX_OUTPUTS:
            raise ValueError(f"a vote lists {count} outputs; it must list 1 to {MAX_OUTPUTS}")
        lengths = {len(self.producers), len(self.digests), len(self.distances_nano)}
        if lengths != {count}:
            raise ValueError(
                f"experts, producers, digests and distances_nano must have one entry per output ({count}), "
                f"got lengths {len(self.producers)}, {len(self.digests)} and {len(self.distances_nano)}"
            )
        seen: set[tuple[int, str]] = set()
        for expert, producer, digest, distance in zip(
            self.experts, self.producers, self.digests, self.distances_nano, strict=True
        ):
            _check_non_negative(expert=expert, distance_nano=distance)
            _check_peer_id(producer, "producer")
            _check_hex(digest, "digest")
            if (expert, producer) in seen:
                raise ValueError(f"producer {producer:.16} is listed twice for expert {expert}")
            seen.add((expert, producer))


@event_type(version="1.1", family=QUORUM)
@dataclass(frozen=True, slots=True)
class QuorumDecided:
    """The outcome of the votes on one MoE layer's expert outputs at one step.

    `winner_digests[i]` is the digest of the output used for `experts[i]` ("" when no
    quorum formed). A producer is in `dissenting` when at least one of its outputs was
    outside its expert's winning group, otherwise in `agreeing`.
    """

    request_id: str
    model_id: str
    step: int
    layer: int
    outcome: str
    quorum: int
    rounds: int
    experts: tuple[int, ...]
    winner_digests: tuple[str, ...]
    agreeing: tuple[str, ...]
    dissenting: tuple[str, ...]
    spot_check: bool = False
    block: str = ""  # the block of a replicated block step (version 1.1); "" for expert outputs

    def __post_init__(self) -> None:
        _check_call(self.request_id, self.model_id, self.step, self.layer, self.block)
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r:.40} must be one of {', '.join(OUTCOMES)}")
        if self.quorum < 1 or self.rounds < 1:
            raise ValueError(f"quorum and rounds must be >= 1, got {self.quorum} and {self.rounds}")
        if not 0 < len(self.experts) <= MAX_OUTPUTS or len(self.winner_digests) != len(self.experts):
            raise ValueError(
                f"experts ({len(self.experts)}) and winner_digests ({len(self.winner_digests)}) "
                f"must have equal lengths of 1 to {MAX_OUTPUTS}"
            )
        for expert, digest in zip(self.experts, self.winner_digests, strict=True):
            _check_non_negative(expert=expert)
            if digest:
                _check_hex(digest, "winner digest")
            elif self.outcome == AGREED:
                raise ValueError(f"outcome {AGREED} needs a winner digest for expert {expert}")
        for producer in (*self.agreeing, *self.dissenting):
            _check_peer_id(producer, "producer")
        if len(set(self.agreeing) | set(self.dissenting)) != len(self.agreeing) + len(self.dissenting):
            raise ValueError("a producer is listed twice in agreeing and dissenting; list each once")
        if len(self.agreeing) + len(self.dissenting) > MAX_OUTPUTS:
            raise ValueError(f"a decision names more than {MAX_OUTPUTS} producers")


@event_type(version="1.0", family=QUORUM)
@dataclass(frozen=True, slots=True)
class PeerPenalized:
    """A penalty by the author on `peer` for `reason`, with the ids of the events that show it in `evidence`."""

    peer: str
    reason: str
    evidence: tuple[str, ...]
    detail: str = ""

    def __post_init__(self) -> None:
        _check_peer_id(self.peer, "peer")
        _check_code(self.reason, "reason")
        if len(self.evidence) > MAX_EVIDENCE:
            raise ValueError(f"evidence lists {len(self.evidence)} event ids, more than the limit of {MAX_EVIDENCE}")
        for evidence_id in self.evidence:
            _check_hex(evidence_id, "evidence event id")
        if len(self.detail) > MAX_DETAIL_CHARS:
            raise ValueError(f"detail has {len(self.detail)} characters, more than the limit of {MAX_DETAIL_CHARS}")

    def check_envelope(self, author: str, seq: int) -> None:
        if self.peer == author:
            raise ValueError("a peer cannot penalize itself; name another peer")
