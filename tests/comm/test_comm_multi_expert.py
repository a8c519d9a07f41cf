"""Multi-expert calls: one call carries several experts' rows, with a signed record per tensor or one batch record."""

from __future__ import annotations

import asyncio

from collections.abc import AsyncIterator

import pytest
import torch
from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node, NodeFactory, RawClient, build_call
from test_comm_malformed import flip

from cortex.comm import (
    CallFailed,
    ExpertBatchProduced,
    ExpertBatchSent,
    ExpertInputSent,
    ExpertOutputProduced,
    FrameLimits,
    FrameReason,
    IncomingCall,
    Response,
)
from cortex.comm.frames import DTYPE_NAMES, digest_of, encode_header
from events import Identity, PeerHeartbeat
from events.writer import DEFERRED_FLUSH_DELAY_S

EXPERTS = (2, 5, 9)
SHARED = {"model_id": EXPERT_FIELDS["model_id"], "step": 3}


async def scale_by_expert(call: IncomingCall) -> Response:
    """Multiply each input by its record's expert index + 1, and name that expert on the output."""
    tensors: dict[str, torch.Tensor] = {}
    per_tensor: dict[str, dict[str, object]] = {}
    for received in call.inputs:
        expert = received.fields["expert"]
        tensors[received.name] = received.tensor * (expert + 1)
        per_tensor[received.name] = {"layer": received.fields["layer"], "expert": expert}
    batch = isinstance(call.inputs[0].event.body, ExpertBatchSent)
    return Response(ExpertBatchProduced if batch else ExpertOutputProduced, SHARED, tensors, per_tensor)


@pytest.fixture
async def multi_server(nodes: NodeFactory) -> Node:
    node = nodes()
    node.dataplane.register_handler("expert", scale_by_expert, accepts=(ExpertInputSent, ExpertBatchSent))
    await node.dataplane.start()
    return node


@pytest.fixture
async def raw(multi_server: Node) -> AsyncIterator[RawClient]:
    client = RawClient(Identity.generate(), multi_server)
    yield client
    client.close()


def rows(expert: int) -> torch.Tensor:
    return torch.arange(2.0 * (expert % 3 + 1)).reshape(-1, 2) + expert  # [N, 2], N differs per expert


async def test_multi_expert_round_trip(client: Node, multi_server: Node) -> None:
    tensors = {f"expert[1][{expert}]": rows(expert) for expert in EXPERTS}
    per_tensor = {f"expert[1][{expert}]": {"layer": 1, "expert": expert} for expert in EXPERTS}

    reply = await client.dataplane.call(
        multi_server.peer_id,
        multi_server.dataplane.endpoint,
        "expert",
        request_id=REQUEST_ID,
        record=ExpertInputSent,
        fields=SHARED,
        tensors=tensors,
        timeout_s=10.0,
        tensor_fields=per_tensor,
    )

    assert client.dataplane.counters["calls_sent"] == 1
    for expert in EXPERTS:
        name = f"expert[1][{expert}]"
        assert torch.equal(reply.tensors[name], rows(expert) * (expert + 1))
    assert {(out.name, out.event.body.expert) for out in reply.outputs} == {(f"expert[1][{e}]", e) for e in EXPERTS}
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)  # both sides append the records a moment later
    inputs = list(multi_server.store.events(type="ExpertInputSent"))
    assert sorted(event.body.expert for event in inputs) == list(EXPERTS)
    input_ids = {event.id for event in inputs}
    # Every output record is signed by the server and references the request and all inputs of the call.
    for out in reply.outputs:
        assert out.event.author == multi_server.peer_id
        assert out.event.refs[0] == REQUEST_ID and set(out.event.refs[1:]) == input_ids
    assert len(list(client.store.events(type="ExpertOutputProduced"))) == len(EXPERTS)


async def test_tensor_fields_checked(client: Node, multi_server: Node) -> None:
    arguments = dict(request_id=REQUEST_ID, record=ExpertInputSent, fields=SHARED, tensors={"a": rows(1)}, timeout_s=5.0)
    endpoint = multi_server.dataplane.endpoint

    with pytest.raises(ValueError, match="not in `tensors`"):
        await client.dataplane.call(multi_server.peer_id, endpoint, "expert", **arguments, tensor_fields={"b": {"expert": 1}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="filled from each tensor"):
        await client.dataplane.call(multi_server.peer_id, endpoint, "expert", **arguments, tensor_fields={"a": {"digest": "0"}})  # type: ignore[arg-type]


def multi_call(raw: RawClient, *, shape_of_last: tuple[int, ...] | None = None) -> list[bytes]:
    """A hand-built call with one tensor per expert of EXPERTS, each with its own record."""
    parts: list[bytes] = []
    for position, expert in enumerate(EXPERTS):
        overrides: dict[str, object] = {"expert": expert}
        if shape_of_last is not None and position == len(EXPERTS) - 1:
            overrides["shape"] = shape_of_last
        parts += build_call(raw.signer, 1, {f"expert[1][{expert}]": rows(expert)}, **overrides)[1:]
    return [encode_header("call", 1, kind="expert", chunks=[1] * len(EXPERTS)), *parts]


@pytest.mark.parametrize(
    ("corrupt", "reason", "tensor"),
    [
        ("digest_of_second", FrameReason.BAD_DIGEST, "expert[1][5]"),
        ("shape_of_last", FrameReason.SHAPE_MISMATCH, "expert[1][9]"),
    ],
)
async def test_multi_call_bad_tensor_rejected(
    multi_server: Node, raw: RawClient, corrupt: str, reason: FrameReason, tensor: str
) -> None:
    if corrupt == "digest_of_second":
        parts = multi_call(raw)
        parts[4] = flip(parts[4], 3)  # header, record 1, bytes 1, record 2, bytes 2
    else:
        parts = multi_call(raw, shape_of_last=(7, 2))

    await raw.send(parts)
    header, _frames = await raw.receive()

    assert header.op == "error"
    assert header.reason == reason.value
    assert repr(tensor) in header.message
    assert multi_server.dataplane.counters["calls_served"] == 0
    assert [rejection.reason for rejection in multi_server.rejections] == [reason]
    sane = multi_call(raw)
    await raw.send(sane)
    assert (await raw.receive())[0].op == "reply"


async def batch_call(client: Node, server: Node, tensors: dict[str, torch.Tensor], per_tensor: dict[str, dict[str, object]]):  # type: ignore[no-untyped-def]
    return await client.dataplane.call(
        server.peer_id, server.dataplane.endpoint, "expert", request_id=REQUEST_ID, record=ExpertBatchSent,
        fields=SHARED, tensors=tensors, timeout_s=10.0, tensor_fields=per_tensor,
    )


async def test_batch_record_describes_every_expert_of_a_call(client: Node, multi_server: Node) -> None:
    tensors = {f"expert[1][{expert}]": rows(expert) for expert in EXPERTS}
    per_tensor = {f"expert[1][{expert}]": {"layer": 1, "expert": expert} for expert in EXPERTS}

    reply = await batch_call(client, multi_server, tensors, per_tensor)

    for expert in EXPERTS:
        assert torch.equal(reply.tensors[f"expert[1][{expert}]"], rows(expert) * (expert + 1))
    assert {(out.name, out.fields["expert"], out.fields["layer"]) for out in reply.outputs} == {
        (f"expert[1][{e}]", e, 1) for e in EXPERTS
    }
    # One signed record per message on each side, listing the experts in byte order.
    [output] = reply.events
    assert isinstance(output.body, ExpertBatchProduced)
    assert output.body.experts == EXPERTS
    assert output.body.layer == 1
    assert output.body.shapes == tuple(tuple(rows(e).shape) for e in EXPERTS)
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)
    [sent] = list(multi_server.store.events(type="ExpertBatchSent"))
    assert sent.body.names == tuple(tensors)
    assert sent.body.experts == EXPERTS
    assert sent.body.digest == digest_of([rows(e).numpy().data for e in EXPERTS])
    assert output.refs == (REQUEST_ID, sent.id)
    assert [event.id for event in client.store.events(type="ExpertBatchProduced")] == [output.id]


async def test_batch_records_split_by_dtype_and_layer(client: Node, multi_server: Node) -> None:
    tensors = {
        "expert[1][2]": rows(2),
        "expert[1][5]": rows(5).to(torch.bfloat16),
        "expert[3][9]": rows(9),
        "expert[1][7]": rows(7),
    }
    per_tensor = {name: {"layer": int(name[7]), "expert": int(name[10:-1])} for name in tensors}

    reply = await batch_call(client, multi_server, tensors, per_tensor)

    for name, sent in tensors.items():
        expert = per_tensor[name]["expert"]
        assert reply.tensors[name].dtype == sent.dtype
        assert torch.equal(reply.tensors[name], sent * (expert + 1))  # type: ignore[operator]
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)
    groups = sorted((event.body.layer, event.body.dtype, event.body.experts) for event in multi_server.store.events(type="ExpertBatchSent"))
    assert groups == [(1, "bfloat16", (5,)), (1, "float32", (2, 7)), (3, "float32", (9,))]


async def test_batch_record_needs_every_expert(client: Node, multi_server: Node) -> None:
    with pytest.raises(ValueError, match="'expert' for every tensor"):
        await batch_call(client, multi_server, {"a": rows(1), "b": rows(2)}, {"a": {"layer": 1, "expert": 1}, "b": {"layer": 1}})


def batch_parts(raw: RawClient, *, shapes: tuple[tuple[int, ...], ...] | None = None, names: tuple[str, ...] | None = None) -> list[bytes]:
    """A hand-built call with one ExpertBatchSent record for EXPERTS, its fields overridable."""
    tensors = [rows(expert) for expert in EXPERTS]
    data = b"".join(tensor.numpy().tobytes() for tensor in tensors)
    body = ExpertBatchSent(
        model_id=SHARED["model_id"], step=3, layer=1, experts=EXPERTS,
        names=names or tuple(f"expert[1][{expert}]" for expert in EXPERTS), dtype=DTYPE_NAMES[torch.float32],
        shapes=shapes or tuple(tuple(tensor.shape) for tensor in tensors), digest=digest_of([data]), nbytes=len(data),
    )
    return [encode_header("call", 1, kind="expert", chunks=[1]), raw.signer.sign(body).wire, data]


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [("digest", FrameReason.BAD_DIGEST), ("shapes", FrameReason.SHAPE_MISMATCH), ("length", FrameReason.LENGTH_MISMATCH)],
)
async def test_bad_batch_record_rejected(multi_server: Node, raw: RawClient, corrupt: str, reason: FrameReason) -> None:
    if corrupt == "digest":
        parts = batch_parts(raw)
        parts[2] = flip(parts[2], 5)
    elif corrupt == "shapes":
        parts = batch_parts(raw, shapes=((1, 2), (2, 2), (9, 2)))
    else:
        parts = batch_parts(raw)
        parts[2] = parts[2][:-4]

    await raw.send(parts)
    header, _frames = await raw.receive()

    assert header.op == "error"
    assert header.reason == reason.value, header
    assert "expert[1][2]" in header.message
    assert [rejection.reason for rejection in multi_server.rejections] == [reason]
    await raw.send(batch_parts(raw))
    assert (await raw.receive())[0].op == "reply"


def test_batch_record_form_checked() -> None:
    fields = dict(model_id="m", step=0, layer=1, dtype="float32", digest="0" * 64, nbytes=16)
    with pytest.raises(ValueError, match="repeat"):
        ExpertBatchSent(experts=(1, 2), names=("a", "a"), shapes=((1, 2), (1, 2)), **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one expert and one shape per name"):
        ExpertBatchSent(experts=(1,), names=("a", "b"), shapes=((1, 2), (1, 2)), **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 64 tensors"):
        ExpertBatchSent(experts=(), names=(), shapes=(), **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"experts\[1\] must be >= 0"):
        ExpertBatchSent(experts=(1, -1), names=("a", "b"), shapes=((1, 2), (1, 2)), **fields)  # type: ignore[arg-type]


async def test_batch_reply_sorts_after_its_inputs(client: Node, multi_server: Node) -> None:
    # The caller's clock is ahead of the server's: the reply is signed after the inputs arrive,
    # before they are committed, and its Lamport clock must still exceed theirs.
    ahead = [client.writer.write(PeerHeartbeat(index)) for index in range(5)][-1].lamport
    per_tensor = {"expert[1][2]": {"layer": 1, "expert": 2}}

    reply = await batch_call(client, multi_server, {"expert[1][2]": rows(2)}, per_tensor)

    [output] = reply.events
    assert output.lamport > ahead + 1  # the input record took ahead + 1


async def test_tensor_limit_applies_per_tensor_of_a_batch(nodes: NodeFactory) -> None:
    limits = FrameLimits(max_tensor_bytes=1024 * 1024)
    server = nodes(limits=limits)
    server.dataplane.register_handler("expert", scale_by_expert)
    await server.dataplane.start()
    caller = nodes(limits=limits)
    await caller.dataplane.start()
    tensors = {f"expert[1][{expert}]": torch.ones(1000, 200) for expert in range(3)}  # 800,000 bytes each
    per_tensor = {name: {"layer": 1, "expert": expert} for expert, name in enumerate(tensors)}

    reply = await batch_call(caller, server, tensors, per_tensor)

    assert torch.equal(reply.tensors["expert[1][2]"], torch.ones(1000, 200) * 3)
    with pytest.raises(CallFailed, match="oversized"):
        await batch_call(caller, server, {"expert[1][0]": torch.ones(1400, 200)}, {"expert[1][0]": {"layer": 1, "expert": 0}})


async def test_batch_records_hold_at_most_64_tensors(client: Node, multi_server: Node) -> None:
    tensors = {f"expert[1][{expert}]": rows(expert) for expert in range(70)}
    per_tensor = {name: {"layer": 1, "expert": expert} for expert, name in enumerate(tensors)}

    reply = await batch_call(client, multi_server, tensors, per_tensor)

    assert [out.fields["expert"] for out in reply.outputs] == list(range(70))
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)
    sizes = [len(event.body.experts) for event in multi_server.store.events(type="ExpertBatchSent")]
    assert sorted(sizes) == [6, 64]
