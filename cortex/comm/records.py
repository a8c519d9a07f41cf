"""Request-scoped tensor records: the signed events that travel with tensors on the data plane.

Family `records`, scope `request` (see `events.model`): the author numbers these events in
its request sequence, so they stay on the request's route and anti-entropy never copies
them to other nodes. Each event describes exactly one tensor of one message: which request it
belongs to, where in the model it sits, and what its bytes are. The request id (the id of
the request's `RequestSubmitted` event) is the first entry of `refs`. A reply's records also
reference the input records they were computed from: `refs = (request_id, *input_ids)`.

Fields shared by every record type:

    model_id  str              the model id the tensor belongs to
    step      int >= 0         decoding step (0 is the prefill)
    name      str              the tensor's role in the call, such as "hidden"
    dtype     str              float32, bfloat16, float16, int64 or int32
    shape     tuple[int, ...]  dimensions, each >= 0, at most MAX_DIMS of them
    digest    str              BLAKE2b-256 of the tensor bytes, 64 lowercase hex digits
    nbytes    int >= 0         length of the tensor bytes

The types only check the form of each field. Whether `dtype` is allowed and whether
`shape`, `nbytes` and `digest` match the bytes received is checked by the frame decoder
(`cortex.comm.frames`), which rejects a mismatch with its own reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from events import REQUEST_SCOPE, event_type

RECORDS = "records"
MAX_DIMS = 8
MAX_NAME_CHARS = 64

_DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")


def _check_tensor_fields(name: str, dtype: str, shape: tuple[int, ...], digest: str, nbytes: int) -> None:
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"tensor name {name!r:.80} must have 1 to {MAX_NAME_CHARS} characters")
    if not dtype:
        raise ValueError("dtype must not be empty")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"shape {shape!r:.80} has {len(shape)} dimensions, more than the limit of {MAX_DIMS}")
    if any(size < 0 for size in shape):
        raise ValueError(f"shape {shape!r:.80} has a negative dimension")
    if not _DIGEST_PATTERN.fullmatch(digest):
        raise ValueError(f"digest {digest!r:.80} is not BLAKE2b-256 hex (64 lowercase hex digits)")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")


def _check_non_negative(**values: int) -> None:
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")


def _check_block(start: int, stop: int) -> None:
    if not 0 <= start < stop:
        raise ValueError(f"block range [{start}:{stop}] is empty or negative; need 0 <= start < stop")


@event_type(version="1.0", family=RECORDS, scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class ExpertInputSent:
    """The author sent this tensor as input to routed expert `expert` of MoE layer `layer`."""

    model_id: str
    step: int
    layer: int
    expert: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        _check_non_negative(step=self.step, layer=self.layer, expert=self.expert)
        _check_tensor_fields(self.name, self.dtype, self.shape, self.digest, self.nbytes)


@event_type(version="1.0", family=RECORDS, scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class ExpertOutputProduced:
    """The author computed this tensor with routed expert `expert` of MoE layer `layer`."""

    model_id: str
    step: int
    layer: int
    expert: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        _check_non_negative(step=self.step, layer=self.layer, expert=self.expert)
        _check_tensor_fields(self.name, self.dtype, self.shape, self.digest, self.nbytes)


@event_type(version="1.0", family=RECORDS, scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class StageInputSent:
    """The author sent this tensor as input to decoder layers `start` to `stop - 1`.

    `position` is the sequence position of the first token in the tensor, so a holder that
    replays a session's inputs places them in its KV cache where the first holder did.
    """

    model_id: str
    step: int
    start: int
    stop: int
    position: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        _check_non_negative(step=self.step, position=self.position)
        _check_block(self.start, self.stop)
        _check_tensor_fields(self.name, self.dtype, self.shape, self.digest, self.nbytes)


@event_type(version="1.0", family=RECORDS, scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class StageOutputProduced:
    """The author computed this tensor with decoder layers `start` to `stop - 1`."""

    model_id: str
    step: int
    start: int
    stop: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        _check_non_negative(step=self.step)
        _check_block(self.start, self.stop)
        _check_tensor_fields(self.name, self.dtype, self.shape, self.digest, self.nbytes)


RecordBody = ExpertInputSent | ExpertOutputProduced | StageInputSent | StageOutputProduced
RECORD_TYPES: tuple[type, ...] = (ExpertInputSent, ExpertOutputProduced, StageInputSent, StageOutputProduced)

# The fields the data plane fills from the tensor itself; the caller supplies the others.
TENSOR_FIELDS = frozenset({"name", "dtype", "shape", "digest", "nbytes"})
