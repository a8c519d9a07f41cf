"""Request-scoped tensor records: the signed events that travel with tensors on the data plane.

Family `records`, scope `request` (see `events.model`): the author numbers these events in
its request sequence, so they stay on the request's route and anti-entropy never copies
them to other nodes. A record describes the tensors of one message: which request they
belong to, where in the model they sit, and what their bytes are. `ExpertInputSent`,
`ExpertOutputProduced`, `StageInputSent` and `StageOutputProduced` describe one tensor
each; `ExpertBatchSent` and `ExpertBatchProduced` describe all the experts' tensors of a
multi-expert call in one record (the data plane's expert calls use these). The request id (the id of
the request's `RequestSubmitted` event) is the first entry of `refs`. A reply's records also
reference the input records they were computed from: `refs = (request_id, *input_ids)`.

Fields of the one-tensor record types:

    model_id  str              the model id the tensor belongs to
    step      int >= 0         decoding step (0 is the prefill)
    name      str              the tensor's role in the call, such as "hidden"
    dtype     str              float32, bfloat16, float16, int64 or int32
    shape     tuple[int, ...]  dimensions, each >= 0, at most MAX_DIMS of them
    digest    str              BLAKE2b-256 of the tensor bytes, 64 lowercase hex digits
    nbytes    int >= 0         length of the tensor bytes

A batch record has `names`, `experts` and `shapes` lists (one entry per tensor, in byte
order) and one `dtype`, `digest` and `nbytes` for the concatenated bytes; `tensor_entries`
turns any record into its tensors.

The types only check the form of each field. Whether `dtype` is allowed and whether
`shape`, `nbytes` and `digest` match the bytes received is checked by the frame decoder
(`cortex.comm.frames`), which rejects a mismatch with its own reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from events import REQUEST_SCOPE, event_type

RECORDS = "records"
MAX_DIMS = 8
MAX_NAME_CHARS = 64
MAX_BATCH_TENSORS = 64

_DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")


def _check_name_and_shape(name: str, shape: tuple[int, ...]) -> None:
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"tensor name {name!r:.80} must have 1 to {MAX_NAME_CHARS} characters")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"shape {shape!r:.80} has {len(shape)} dimensions, more than the limit of {MAX_DIMS}")
    if any(size < 0 for size in shape):
        raise ValueError(f"shape {shape!r:.80} has a negative dimension")


def _check_tensor_fields(name: str, dtype: str, shape: tuple[int, ...], digest: str, nbytes: int) -> None:
    _check_name_and_shape(name, shape)
    if not dtype:
        raise ValueError("dtype must not be empty")
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


def _check_batch(
    experts: tuple[int, ...], names: tuple[str, ...], dtype: str, shapes: tuple[tuple[int, ...], ...], digest: str, nbytes: int
) -> None:
    if not 0 < len(names) <= MAX_BATCH_TENSORS:
        raise ValueError(f"a batch record describes 1 to {MAX_BATCH_TENSORS} tensors, got {len(names)}")
    if not len(experts) == len(shapes) == len(names):
        raise ValueError(f"a batch record needs one expert and one shape per name: {len(names)} names, {len(experts)} experts, {len(shapes)} shapes")
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names {list(names)!r:.120} repeat; each tensor needs its own name")
    _check_tensor_fields(names[0], dtype, shapes[0], digest, nbytes)
    for name, shape in zip(names[1:], shapes[1:]):
        _check_name_and_shape(name, shape)
    for index, expert in enumerate(experts):
        if expert < 0:
            raise ValueError(f"experts[{index}] must be >= 0, got {expert}")


@event_type(version="1.0", family=RECORDS, scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class ExpertBatchSent:
    """The author sent these tensors in one message, each as input to a routed expert of MoE layer `layer`.

    Tensor i is `names[i]`, for expert `experts[i]`, of shape `shapes[i]`. All have dtype
    `dtype`; their bytes follow each other in this order, `nbytes` in all, with the
    BLAKE2b-256 `digest` of the whole. One record per message instead of one per tensor
    costs one signature, one verification and one log row for a multi-expert call.
    """

    model_id: str
    step: int
    layer: int
    experts: tuple[int, ...]
    names: tuple[str, ...]
    dtype: str
    shapes: tuple[tuple[int, ...], ...]
    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        _check_non_negative(step=self.step, layer=self.layer)
        _check_batch(self.experts, self.names, self.dtype, self.shapes, self.digest, self.nbytes)


@event_type(version="1.0", family=RECORDS, scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class ExpertBatchProduced:
    """The author computed these tensors, tensor i with routed expert `experts[i]` of MoE layer `layer`.

    The layout is that of `ExpertBatchSent`.
    """

    model_id: str
    step: int
    layer: int
    experts: tuple[int, ...]
    names: tuple[str, ...]
    dtype: str
    shapes: tuple[tuple[int, ...], ...]
    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        _check_non_negative(step=self.step, layer=self.layer)
        _check_batch(self.experts, self.names, self.dtype, self.shapes, self.digest, self.nbytes)


RecordBody = (
    ExpertInputSent | ExpertOutputProduced | StageInputSent | StageOutputProduced | ExpertBatchSent | ExpertBatchProduced
)
RECORD_TYPES: tuple[type, ...] = (
    ExpertInputSent, ExpertOutputProduced, StageInputSent, StageOutputProduced, ExpertBatchSent, ExpertBatchProduced
)
# Record types that describe several tensors: per-tensor field -> the tuple field that lists it.
BATCH_FIELDS: dict[type, dict[str, str]] = {ExpertBatchSent: {"expert": "experts"}, ExpertBatchProduced: {"expert": "experts"}}
EXPERT_INPUT_TYPES: tuple[type, ...] = (ExpertInputSent, ExpertBatchSent)
EXPERT_OUTPUT_TYPES: tuple[type, ...] = (ExpertOutputProduced, ExpertBatchProduced)

# The fields the data plane fills from the tensor itself; the caller supplies the others.
TENSOR_FIELDS = frozenset({"name", "dtype", "shape", "digest", "nbytes"})
# The same for a batch record, with the per-tensor lists.
BATCH_TENSOR_FIELDS = frozenset({"names", "dtype", "shapes", "digest", "nbytes", "experts"})


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor a record describes: its name, shape, byte length and its own fields (layer, expert, ...)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    fields: dict[str, Any]


def tensor_entries(body: Any, item_size: int) -> list[TensorEntry]:
    """Return the tensors a record describes, in byte order; `item_size` is the size of its dtype.

    For a batch record, each tensor's byte length is its shape times `item_size`; the caller
    checks that they add up to `nbytes`. The fields of an entry are the record's fields other
    than the tensor description, with a batch record's list entry (`expert`) for that tensor.
    """
    per_tensor = BATCH_FIELDS.get(type(body))
    if per_tensor is None:
        shared = {key: getattr(body, key) for key in body.__dataclass_fields__ if key not in TENSOR_FIELDS}
        return [TensorEntry(body.name, body.dtype, body.shape, body.nbytes, shared)]
    shared = {key: getattr(body, key) for key in body.__dataclass_fields__ if key not in BATCH_TENSOR_FIELDS}
    lists = {single: getattr(body, plural) for single, plural in per_tensor.items()}
    return [
        TensorEntry(
            name, body.dtype, shape, math.prod(shape) * item_size, {**shared, **{key: values[index] for key, values in lists.items()}}
        )
        for index, (name, shape) in enumerate(zip(body.names, body.shapes))
    ]
