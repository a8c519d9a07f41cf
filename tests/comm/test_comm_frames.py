"""Frame codec, receive buffers and record types, without sockets."""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence

import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.comm import CHUNK_BYTES, ExpertInputSent, FrameReason, FrameRejected, StageInputSent
from cortex.comm.buffers import BufferPool, assemble
from cortex.comm.frames import (
    DTYPE_NAMES,
    DTYPES,
    ITEM_SIZES,
    Header,
    check_tensor,
    chunk_parts,
    decode_header,
    describe,
    digest_of,
    encode_error,
    encode_header,
    encode_message,
    split_records,
    tensor_bytes,
)
from cortex.comm.validation import Expectations, FrameLimits, curve_key_text, receive_records
from events import Identity, sign_event

DIGEST = "00" * 32
REQUEST = "ab" * 32


def frames_of(parts: Sequence[bytes | memoryview | zmq.Frame]) -> list[zmq.Frame]:
    return [part if isinstance(part, zmq.Frame) else zmq.Frame(bytes(part)) for part in parts]


def test_item_sizes_match_torch() -> None:
    assert ITEM_SIZES == {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}
    assert set(DTYPE_NAMES.values()) == set(DTYPES)


def test_header_round_trip() -> None:
    call = decode_header(encode_header("call", 7, kind="expert", chunks=[1, 3]))
    error = decode_header(encode_error(9, "bad_digest", "tensor 'x' bytes differ")[0])  # type: ignore[arg-type]

    assert call == Header("call", 7, kind="expert", chunks=(1, 3))
    assert error == Header("error", 9, reason="bad_digest", message="tensor 'x' bytes differ")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"v":2,"op":"call","call":1,"kind":"e","chunks":[1]}',
        b'{"v":1,"op":"push","call":1}',
        b'{"v":1,"op":"call","call":-1,"kind":"e","chunks":[1]}',
        b'{"v":1,"op":"call","call":1,"kind":"e","chunks":[]}',
        b'{"v":1,"op":"call","call":1,"kind":"e","chunks":[0]}',
        b'{"v":1,"op":"call","call":1,"kind":"e","chunks":[1],"extra":1}',
        b'{"v":1,"op":"reply","call":1,"chunks":[1.5]}',
        b'{"v":1,"op":"error","call":1,"reason":3,"message":""}',
    ],
)
def test_bad_header_is_rejected_as_malformed(data: bytes) -> None:
    with pytest.raises(FrameRejected) as caught:
        decode_header(data)

    assert caught.value.reason is FrameReason.MALFORMED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decode_header_raises_only_frame_rejected(data: bytes) -> None:
    try:
        decode_header(data)
    except FrameRejected as rejection:
        assert rejection.reason is FrameReason.MALFORMED


def test_split_records_groups_chunks() -> None:
    parts = frames_of([b"e1", b"c1", b"e2", b"c2", b"c3"])

    records = split_records(Header("call", 1, chunks=(1, 2)), parts)

    assert [(event.bytes, [chunk.bytes for chunk in chunks]) for event, chunks in records] == [
        (b"e1", [b"c1"]),
        (b"e2", [b"c2", b"c3"]),
    ]


def test_split_records_rejects_missing_parts() -> None:
    with pytest.raises(FrameRejected) as caught:
        split_records(Header("call", 1, chunks=(2,)), frames_of([b"e1", b"c1"]))

    assert caught.value.reason is FrameReason.TRUNCATED


def test_chunk_parts_cut_at_chunk_size() -> None:
    flat, data = tensor_bytes(torch.zeros(CHUNK_BYTES // 4 * 2 + 5, dtype=torch.float32))

    parts = chunk_parts(data)

    assert [len(part.bytes) if isinstance(part, zmq.Frame) else len(part) for part in parts] == [CHUNK_BYTES, CHUNK_BYTES, 20]
    assert isinstance(parts[0], zmq.Frame) and parts[0].tracker is not None
    assert isinstance(parts[2], bytes)


def test_describe_fills_tensor_fields() -> None:
    tensor = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    flat, data = tensor_bytes(tensor)

    fields = describe("ids", tensor, data)

    assert fields == {
        "name": "ids",
        "dtype": "int32",
        "shape": (2, 3),
        "digest": digest_of((tensor.numpy().tobytes(),)),
        "nbytes": 24,
    }


def test_tensor_bytes_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="float64"):
        tensor_bytes(torch.zeros(2, dtype=torch.float64))


def test_check_tensor_accepts_matching_record() -> None:
    body = ExpertInputSent("m", 0, 0, 0, "x", "bfloat16", (2, 3), DIGEST, 12)

    check_tensor(body, frames_of([b"a" * 8, b"b" * 4]), max_tensor_bytes=100)


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "chunks", "limit", "reason"),
    [
        ("float64", (2,), 16, [16], 100, FrameReason.BAD_DTYPE),
        ("float32", (2, 3), 20, [20], 100, FrameReason.SHAPE_MISMATCH),
        ("float32", (40,), 160, [160], 100, FrameReason.OVERSIZED),
        ("float32", (4,), 16, [12], 100, FrameReason.LENGTH_MISMATCH),
        ("float32", (4,), 16, [8, 8, 4], 100, FrameReason.LENGTH_MISMATCH),
    ],
)
def test_check_tensor_rejects(
    dtype: str, shape: tuple[int, ...], nbytes: int, chunks: list[int], limit: int, reason: FrameReason
) -> None:
    body = ExpertInputSent("m", 0, 0, 0, "x", dtype, shape, DIGEST, nbytes)

    with pytest.raises(FrameRejected) as caught:
        check_tensor(body, frames_of([b"z" * size for size in chunks]), max_tensor_bytes=limit)

    assert caught.value.reason is reason


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_assemble_from_chunks_is_exact(dtype: str) -> None:
    sent = torch.arange(60, dtype=torch.int64).to(DTYPES[dtype]).reshape(3, 4, 5)
    data = sent.numpy().tobytes() if dtype != "bfloat16" else sent.view(torch.int16).numpy().tobytes()
    chunks = frames_of([data[offset : offset + 7] for offset in range(0, len(data), 7)])

    received = assemble(dtype, (3, 4, 5), chunks, BufferPool())

    assert received.dtype == DTYPES[dtype]
    assert torch.equal(received, sent)


def test_assemble_single_chunk_views_the_frame() -> None:
    frame = zmq.Frame(torch.arange(4.0).numpy().tobytes())

    received = assemble("float32", (4,), [frame], BufferPool())

    assert received.data_ptr() == torch.frombuffer(frame.buffer, dtype=torch.uint8).data_ptr()


def test_pool_reuses_a_buffer_once_released() -> None:
    pool = BufferPool()
    first = pool.take(1000)
    address = first.data_ptr()
    view = first[10:20]
    del first

    second = pool.take(1000)
    second_address = second.data_ptr()
    assert second_address != address   # a view of the first buffer is still alive
    del view, second
    gc.collect()
    third = pool.take(900)

    assert third.data_ptr() in {address, second_address}
    assert pool.reused == 1
    assert pool.allocated == 2


def test_pool_keeps_at_most_max_buffers() -> None:
    pool = BufferPool(max_buffers=2)
    held = [pool.take(100 * (index + 1)) for index in range(4)]

    assert len(pool) == 2
    assert pool.pooled_bytes == 300 + 400
    assert len(held) == 4


def test_pool_keeps_at_most_max_bytes() -> None:
    pool = BufferPool(max_bytes=1000)
    held = [pool.take(400), pool.take(400), pool.take(400)]
    too_large = pool.take(2000)

    assert len(pool) == 2
    assert pool.pooled_bytes == 800
    assert too_large.numel() == 2000
    assert pool.allocated == 4
    assert len(held) == 3


@pytest.mark.parametrize(
    "fields",
    [
        {"step": -1},
        {"shape": (-1, 2)},
        {"shape": (1,) * 9},
        {"digest": "XY" * 32},
        {"name": ""},
        {"nbytes": -4},
    ],
)
def test_record_rejects_bad_fields(fields: dict[str, object]) -> None:
    values: dict[str, object] = {
        "model_id": "m", "step": 0, "layer": 0, "expert": 0, "name": "x",
        "dtype": "float32", "shape": (1,), "digest": DIGEST, "nbytes": 4,
    }
    values.update(fields)

    with pytest.raises(ValueError):
        ExpertInputSent(**values)  # type: ignore[arg-type]


def test_stage_record_rejects_empty_block() -> None:
    with pytest.raises(ValueError, match="block range"):
        StageInputSent("m", 0, 4, 4, 0, "x", "float32", (1,), DIGEST, 4)


SIGNER = Identity.generate()


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    values = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    return (values * draw(st.integers(-1000, 1000))).to(DTYPES[dtype])


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4))
def test_encoded_message_decodes_to_same_tensors(sent: list[torch.Tensor]) -> None:
    records = []
    for index, tensor in enumerate(sent):
        _flat, data = tensor_bytes(tensor)
        body = ExpertInputSent(model_id="m", step=0, layer=0, expert=0, **describe(f"t{index}", tensor, data))
        event = sign_event(SIGNER, body, seq=index + 1, lamport=1, time_ms=0, refs=(REQUEST,))
        records.append((event, chunk_parts(data)))
    parts = frames_of(encode_message("call", 5, "expert", records))
    expect = Expectations(
        accepts=(ExpertInputSent,),
        is_known_request=lambda request: request == REQUEST,
        authenticated_key=curve_key_text(SIGNER.peer_id),
    )

    header = decode_header(parts[0].buffer)
    received = receive_records(header, parts[1:], expect, FrameLimits(), None, BufferPool())

    assert header.kind == "expert"
    assert [item.name for item in received] == [f"t{index}" for index in range(len(sent))]
    for item, tensor in zip(received, sent):
        assert item.tensor.dtype == tensor.dtype
        assert item.tensor.shape == tensor.shape
        assert torch.equal(item.tensor, tensor)
