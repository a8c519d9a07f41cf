"""Tensor frame format: the ZeroMQ multipart layout of data-plane calls, replies and errors.

This module is the codec only (no sockets), so it is tested without a network.

A call goes from a DEALER to a ROUTER. The ROUTER receives one extra leading routing-id
part, which ZeroMQ adds and strips. A message is one multipart ZeroMQ message:

    part 0          header: canonical JSON (orjson, sorted keys), at most MAX_HEADER_BYTES
    for each record i in 0 .. len(header.chunks) - 1:
        part        the record event, in event wire form (payload || signature)
        parts       header.chunks[i] chunks of the raw bytes of its tensor(s), in order

Header fields:

    v        int   frame format version, FRAME_VERSION (1)
    op       str   "call", "reply" or "error"
    call     int   call id chosen by the caller, echoed in the reply, 0 <= call < 2**63
    kind     str   handler the call is for, such as "expert" (op "call" only)
    chunks   list  number of chunk parts of each record, 1 to MAX_CHUNKS each, for 1 to
                   MAX_TENSORS records (op "call" and "reply")
    reason   str   why the call failed (op "error" only): a FrameReason value, or
                   "busy", "handler_failed", "handler_timeout", "internal_error"
    message  str   human-readable detail of the error (op "error" only)

An error message has the header part only. Every record event is a signed event of the
`records` family (see `cortex.comm.records`) that names the dtype, shape(s), byte length
and BLAKE2b-256 digest of its tensor, or of its tensors one after the other.

Multi-expert calls: the records of one message share one author, one request id (the
first ref) and distinct tensor names, but their other fields may differ. A call for
several experts of one replica carries one tensor per expert, named `expert[l][e]`. A
node describes them with one `ExpertBatchSent` record per layer and dtype (bytes one
tensor after the other, at most MAX_BATCH_TENSORS per record); the reply carries one
output per input, under the same name, in `ExpertBatchProduced` records. A record is
checked as a whole (dtype, every shape against the total length, chunk lengths, digest,
signature) and rejected with its reason, which names its tensors. One record per tensor
(`ExpertInputSent`, `ExpertOutputProduced`) is the same layout with one tensor per record.
The layout and version did not change for either. An expert handler written before
multi-expert calls answers only its first tensor; the caller then finds outputs missing
and fails that replica, so the nodes of a swarm must all serve multi-expert calls. Tensor bytes are the tensor's contiguous memory in C order,
little-endian. The dtype names on the wire are:

    float32 (4 bytes)   bfloat16 (2)   float16 (2)   int64 (8)   int32 (4)

A tensor's bytes are cut into chunks of CHUNK_BYTES (2 MiB), the last one shorter; an empty
tensor has one empty chunk. Chunks keep each ZeroMQ frame small: one 64 MiB frame moved at
less than half the throughput of 2 MiB chunks copied into a reused buffer (loopback with
CurveZMQ, see docs/dataplane.md). A receiver accepts chunks of up to MAX_CHUNK_BYTES and
checks that their lengths add up to the record's `nbytes`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import torch
import zmq

from cortex.comm.errors import FrameReason, FrameRejected
from cortex.comm.records import TensorEntry, tensor_entries
from events import MAX_PAYLOAD_BYTES, Event

FRAME_VERSION = 1
CHUNK_BYTES = 2 * 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
MAX_TENSOR_BYTES = 256 * 1024 * 1024
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_TENSORS = 64
MAX_CHUNKS = 65536
MAX_HEADER_BYTES = 4096
# ZeroMQ drops a connection that sends a single frame larger than this (ZMQ_MAXMSGSIZE).
MAX_FRAME_BYTES = max(MAX_CHUNK_BYTES, MAX_PAYLOAD_BYTES + 64, MAX_HEADER_BYTES)
# Chunks below this size are copied into the ZeroMQ message, which costs less than tracking.
ZERO_COPY_MIN_BYTES = 64 * 1024

OPS = frozenset({"call", "reply", "error"})
MAX_CALL_ID = 2**63 - 1

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
ITEM_SIZES: dict[str, int] = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}

Part = bytes | memoryview | zmq.Frame


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header part."""

    op: str
    call_id: int
    kind: str = ""
    chunks: tuple[int, ...] = ()
    reason: str = ""
    message: str = ""


def digest_of(chunks: Sequence[Any]) -> str:
    """Return the BLAKE2b-256 hex digest of the concatenated buffers."""
    hasher = hashlib.blake2b(digest_size=32)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """Return a contiguous CPU form of `tensor` and a byte view of its memory (no copy if possible).

    The first value keeps the memory alive. A non-contiguous or non-CPU tensor is copied once.
    Raises ValueError for a dtype the data plane does not carry.
    """
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(
            f"tensor dtype {tensor.dtype} is not carried by the data plane; "
            f"convert it to one of {sorted(DTYPES)}"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat, flat.view(torch.uint8).numpy().data


def describe(name: str, tensor: torch.Tensor, data: memoryview) -> dict[str, Any]:
    """Return the record fields that the data plane fills from a tensor and its bytes."""
    return {
        "name": name,
        "dtype": DTYPE_NAMES[tensor.dtype],
        "shape": tuple(tensor.shape),
        "digest": digest_of((data,)),
        "nbytes": data.nbytes,
    }


def chunk_parts(data: memoryview) -> list[Part]:
    """Cut tensor bytes into chunk parts; large chunks are zero-copy frames with a send tracker."""
    if data.nbytes == 0:
        return [b""]
    parts: list[Part] = []
    for offset in range(0, data.nbytes, CHUNK_BYTES):
        chunk = data[offset : offset + CHUNK_BYTES]
        if chunk.nbytes < ZERO_COPY_MIN_BYTES:
            parts.append(chunk.tobytes())
        else:
            parts.append(zmq.Frame(chunk, track=True, copy=False))
    return parts


def joined_chunk_parts(datas: Sequence[memoryview]) -> list[Part]:
    """Cut the bytes of several tensors, one after the other, into chunk parts.

    Tensors under ZERO_COPY_MIN_BYTES in all are joined into one copied part, so they take
    one ZeroMQ frame instead of one per tensor. Otherwise each tensor's chunks follow the
    previous ones.
    """
    if sum(data.nbytes for data in datas) < ZERO_COPY_MIN_BYTES:
        return [b"".join(datas)]
    return [part for data in datas for part in chunk_parts(data)]


def encode_header(
    op: str, call_id: int, *, kind: str = "", chunks: Sequence[int] = (), reason: str = "", message: str = ""
) -> bytes:
    """Serialize a header part."""
    fields: dict[str, Any] = {"v": FRAME_VERSION, "op": op, "call": call_id}
    if op == "call":
        fields["kind"] = kind
    if op in ("call", "reply"):
        fields["chunks"] = list(chunks)
    else:
        fields["reason"] = reason
        fields["message"] = message[:1024]
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def encode_message(op: str, call_id: int, kind: str, records: Sequence[tuple[Event, list[Part]]]) -> list[Part]:
    """Lay out a call or reply: the header, then each record event followed by its chunk parts."""
    header = encode_header(op, call_id, kind=kind, chunks=[len(chunks) for _event, chunks in records])
    parts: list[Part] = [header]
    for event, chunks in records:
        parts.append(event.wire)
        parts.extend(chunks)
    return parts


def encode_error(call_id: int, reason: str, message: str) -> list[Part]:
    """Lay out an error reply: a header part only."""
    return [encode_header("error", call_id, reason=reason, message=message)]


def decode_header(data: bytes | memoryview) -> Header:
    """Parse and check a header part; raise FrameRejected(MALFORMED) with what is wrong."""
    if len(data) > MAX_HEADER_BYTES:
        raise FrameRejected(
            FrameReason.MALFORMED, f"header of {len(data)} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise FrameRejected(FrameReason.MALFORMED, f"header is not valid JSON: {error}") from None
    if type(fields) is not dict:
        raise FrameRejected(FrameReason.MALFORMED, f"header is a JSON {type(fields).__name__}, not an object")
    if fields.get("v") != FRAME_VERSION:
        raise FrameRejected(
            FrameReason.MALFORMED,
            f"header has frame version {fields.get('v')!r:.40}, but this node reads version {FRAME_VERSION}",
        )
    op, call_id = fields.get("op"), fields.get("call")
    if op not in OPS:
        raise FrameRejected(FrameReason.MALFORMED, f"header op {op!r:.40} is not one of {sorted(OPS)}")
    if type(call_id) is not int or not 0 <= call_id <= MAX_CALL_ID:
        raise FrameRejected(FrameReason.MALFORMED, f"header call id {call_id!r:.40} is not an int in [0, 2**63)")
    expected = {"v", "op", "call"} | ({"kind", "chunks"} if op == "call" else set())
    expected |= {"chunks"} if op == "reply" else set()
    expected |= {"reason", "message"} if op == "error" else set()
    if fields.keys() != expected:
        raise FrameRejected(
            FrameReason.MALFORMED, f"{op} header has fields {sorted(fields)}, expected {sorted(expected)}"
        )
    if op == "error":
        return _decode_error_header(call_id, fields)
    return Header(op, call_id, kind=_decode_kind(fields), chunks=_decode_chunks(fields["chunks"]))


def _decode_error_header(call_id: int, fields: dict[str, Any]) -> Header:
    reason, message = fields["reason"], fields["message"]
    if type(reason) is not str or type(message) is not str:
        raise FrameRejected(FrameReason.MALFORMED, "error header reason and message must be strings")
    return Header("error", call_id, reason=reason[:64], message=message[:1024])


def _decode_kind(fields: dict[str, Any]) -> str:
    kind = fields.get("kind", "")
    if type(kind) is not str or len(kind) > 64:
        raise FrameRejected(FrameReason.MALFORMED, f"header kind {kind!r:.80} is not a string of at most 64 characters")
    return kind


def _decode_chunks(chunks: Any) -> tuple[int, ...]:
    if type(chunks) is not list or not 0 < len(chunks) <= MAX_TENSORS:
        raise FrameRejected(
            FrameReason.MALFORMED, f"header chunks must be a list of 1 to {MAX_TENSORS} counts, got {chunks!r:.80}"
        )
    for count in chunks:
        if type(count) is not int or not 1 <= count <= MAX_CHUNKS:
            raise FrameRejected(
                FrameReason.MALFORMED, f"header chunk count {count!r:.40} is not an int in [1, {MAX_CHUNKS}]"
            )
    return tuple(chunks)


def split_records(header: Header, parts: Sequence[zmq.Frame]) -> list[tuple[zmq.Frame, list[zmq.Frame]]]:
    """Group the parts after the header into (record event, chunks) per tensor.

    Raises FrameRejected(TRUNCATED) when parts are missing and MALFORMED when extra parts follow.
    """
    expected = sum(1 + count for count in header.chunks)
    if len(parts) < expected:
        raise FrameRejected(
            FrameReason.TRUNCATED,
            f"{header.op} {header.call_id} has {len(parts)} parts after the header, but its header announces {expected}",
        )
    if len(parts) > expected:
        raise FrameRejected(
            FrameReason.MALFORMED,
            f"{header.op} {header.call_id} has {len(parts)} parts after the header, more than the {expected} announced",
        )
    records = []
    index = 0
    for count in header.chunks:
        records.append((parts[index], list(parts[index + 1 : index + 1 + count])))
        index += 1 + count
    return records


def check_tensor(body: Any, chunks: Sequence[zmq.Frame], max_tensor_bytes: int) -> list[TensorEntry]:
    """Check a record's dtype, shapes and sizes against its limits and the chunk lengths received.

    Return the tensors the record describes (one, or each tensor of a batch record). The
    digest is checked separately (`check_digest`), after the signature, because it is the
    costly check.
    """
    label = _record_label(body)
    itemsize = ITEM_SIZES.get(body.dtype)
    if itemsize is None:
        raise FrameRejected(
            FrameReason.BAD_DTYPE, f"tensor {label} has dtype {body.dtype!r:.40}; allowed dtypes are {sorted(DTYPES)}"
        )
    entries = tensor_entries(body, itemsize)
    # The limit is per tensor: a batch record's total is bounded by the message limit.
    for entry in entries:
        if entry.nbytes > max_tensor_bytes:
            raise FrameRejected(
                FrameReason.OVERSIZED,
                f"tensor {entry.name!r} of {entry.nbytes} bytes exceeds the limit of {max_tensor_bytes} bytes "
                "(MAX_TENSOR_BYTES); split the batch into smaller calls or raise max_tensor_bytes on both nodes",
            )
    expected = sum(math.prod(entry.shape) * itemsize for entry in entries)
    if expected != body.nbytes:
        shapes = entries[0].shape if len(entries) == 1 else [entry.shape for entry in entries]
        raise FrameRejected(
            FrameReason.SHAPE_MISMATCH,
            f"tensor {label} has shape {shapes!r:.200} of {body.dtype}, which is {expected} bytes, "
            f"but its record says {body.nbytes} bytes",
        )
    for chunk in chunks:
        if len(chunk) > MAX_CHUNK_BYTES:
            raise FrameRejected(
                FrameReason.OVERSIZED,
                f"tensor {label} has a chunk of {len(chunk)} bytes, over the limit of {MAX_CHUNK_BYTES} bytes",
            )
    received = sum(len(chunk) for chunk in chunks)
    if received != body.nbytes:
        raise FrameRejected(
            FrameReason.LENGTH_MISMATCH,
            f"tensor {label} arrived with {received} bytes in {len(chunks)} chunks, but its record says {body.nbytes}",
        )
    return entries


def _record_label(body: Any) -> str:
    """Name the tensor(s) of a record in an error message."""
    names = getattr(body, "names", None)
    if names is None:
        return repr(body.name)
    return repr(names[0]) if len(names) == 1 else f"{list(names)!r:.120}"


def check_digest(body: Any, chunks: Sequence[zmq.Frame]) -> None:
    """Check that the chunks hash to the record's digest; raise FrameRejected(BAD_DIGEST)."""
    digest = digest_of([chunk.buffer for chunk in chunks])
    if digest != body.digest:
        raise FrameRejected(
            FrameReason.BAD_DIGEST,
            f"tensor {_record_label(body)} bytes hash to {digest}, but its signed record says {body.digest}",
        )
