"""Multi-expert calls: one call carries several experts' rows, each tensor with its own signed record."""

from __future__ import annotations

import asyncio

from collections.abc import AsyncIterator

import pytest
import torch
from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node, NodeFactory, RawClient, build_call
from test_comm_malformed import flip

from cortex.comm import ExpertInputSent, ExpertOutputProduced, FrameReason, IncomingCall, Response
from cortex.comm.frames import encode_header
from events import Identity

EXPERTS = (2, 5, 9)
SHARED = {"model_id": EXPERT_FIELDS["model_id"], "step": 3}


async def scale_by_expert(call: IncomingCall) -> Response:
    """Multiply each input by its record's expert index + 1, and name that expert on the output."""
    tensors: dict[str, torch.Tensor] = {}
    per_tensor: dict[str, dict[str, object]] = {}
    for received in call.inputs:
        body = received.event.body
        tensors[received.name] = received.tensor * (body.expert + 1)
        per_tensor[received.name] = {"layer": body.layer, "expert": body.expert}
    return Response(ExpertOutputProduced, SHARED, tensors, per_tensor)


@pytest.fixture
async def multi_server(nodes: NodeFactory) -> Node:
    node = nodes()
    node.dataplane.register_handler("expert", scale_by_expert, accepts=(ExpertInputSent,))
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
    inputs = list(multi_server.store.events(type="ExpertInputSent"))
    assert sorted(event.body.expert for event in inputs) == list(EXPERTS)
    input_ids = {event.id for event in inputs}
    # Every output record is signed by the server and references the request and all inputs of the call.
    for out in reply.outputs:
        assert out.event.author == multi_server.peer_id
        assert out.event.refs[0] == REQUEST_ID and set(out.event.refs[1:]) == input_ids
    await asyncio.sleep(0)  # the client appends the reply's records on the next loop iteration
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
