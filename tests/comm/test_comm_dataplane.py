"""DataPlane calls between real nodes over CurveZMQ on loopback."""

from __future__ import annotations

import asyncio

import pytest
import torch
import zmq
import zmq.asyncio
import zmq.utils.monitor

from cortex.comm import (
    CHUNK_BYTES,
    CallFailed,
    DataPlaneClosed,
    ExpertInputSent,
    ExpertOutputProduced,
    IncomingCall,
    PeerTimeout,
    Reply,
    Response,
    StageInputSent,
    StageOutputProduced,
)
from cortex.comm.sockets import configure_client
from events import Identity, PeerLeft
from events.writer import DEFERRED_FLUSH_DELAY_S

from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node, NodeFactory, echo_expert, ipv6_loopback_works

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=generator, dtype=dtype)


async def call_expert(client: Node, server: Node, tensors: dict[str, torch.Tensor], timeout_s: float = 10.0) -> Reply:
    return await client.dataplane.call(
        server.peer_id,
        server.dataplane.endpoint,
        "expert",
        request_id=REQUEST_ID,
        record=ExpertInputSent,
        fields=EXPERT_FIELDS,
        tensors=tensors,
        timeout_s=timeout_s,
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
async def test_round_trip_is_bit_exact_per_dtype(client: Node, server: Node, dtype: torch.dtype) -> None:
    sent = sample_tensor(dtype, (16, 48))

    reply = await call_expert(client, server, {"hidden": sent})

    received = reply.tensors["hidden"]
    assert received.dtype == dtype
    assert received.shape == sent.shape
    assert torch.equal(received.view(torch.uint8), sent.view(torch.uint8))


async def test_round_trip_of_large_tensor_is_chunked_and_exact(client: Node, server: Node) -> None:
    sent = sample_tensor(torch.float32, (9 * 1024 * 1024 // 4 + 3,), seed=7)   # just over 9 MiB: 5 chunks
    assert sent.numel() * 4 > 4 * CHUNK_BYTES

    reply = await call_expert(client, server, {"hidden": sent}, timeout_s=30.0)

    assert torch.equal(reply.tensors["hidden"], sent)
    assert reply.events[0].body.nbytes == sent.numel() * 4


async def test_round_trip_of_scalar_empty_and_strided_tensors(client: Node, server: Node) -> None:
    tensors = {
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 7, dtype=torch.int64),
        "strided": torch.arange(24, dtype=torch.int32).reshape(4, 6).t(),
    }

    reply = await call_expert(client, server, tensors)

    for name, sent in tensors.items():
        assert reply.tensors[name].shape == sent.shape, name
        assert torch.equal(reply.tensors[name], sent), name


async def test_records_land_in_both_logs(client: Node, server: Node) -> None:
    reply = await call_expert(client, server, {"hidden": torch.ones(2, 4)})
    # Records are appended after the message is on its way, a moment later, in one group.
    assert list(client.store.events(type="ExpertOutputProduced")) == []
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)

    input_events = list(client.store.events(type="ExpertInputSent"))
    output_event = reply.events[0]
    assert [event.id for event in server.store.events(type="ExpertInputSent")] == [input_events[0].id]
    assert [event.id for event in client.store.events(type="ExpertOutputProduced")] == [output_event.id]
    assert [event.id for event in server.store.events(type="ExpertOutputProduced")] == [output_event.id]
    assert output_event.author == server.peer_id
    assert output_event.refs == (REQUEST_ID, input_events[0].id)
    assert isinstance(output_event.body, ExpertOutputProduced)
    assert output_event.body.layer == EXPERT_FIELDS["layer"]


async def test_stage_records_round_trip(nodes: NodeFactory, client: Node) -> None:
    async def stage(call: IncomingCall) -> Response:
        body = call.inputs[0].event.body
        fields = {"model_id": body.model_id, "step": body.step, "start": body.start, "stop": body.stop}
        return Response(StageOutputProduced, fields, {"hidden": call.tensors["hidden"] * 2})

    holder = nodes()
    holder.dataplane.register_handler("stage", stage, accepts=(StageInputSent,))
    await holder.dataplane.start()
    fields = {"model_id": "m", "step": 0, "start": 2, "stop": 4, "position": 5}

    reply = await client.dataplane.call(
        holder.peer_id, holder.dataplane.endpoint, "stage", request_id=REQUEST_ID, record=StageInputSent,
        fields=fields, tensors={"hidden": torch.ones(3, 8)}, timeout_s=10.0,
    )

    assert torch.equal(reply.tensors["hidden"], torch.full((3, 8), 2.0))
    assert isinstance(reply.events[0].body, StageOutputProduced)
    assert (reply.events[0].body.start, reply.events[0].body.stop) == (2, 4)


async def test_concurrent_calls_to_one_peer_overlap(nodes: NodeFactory, client: Node) -> None:
    calls = 16
    order: list[tuple[str, int]] = []
    all_started = asyncio.Event()

    async def gated(call: IncomingCall) -> Response:
        index = int(call.tensors["index"].item())
        order.append(("start", index))
        if sum(1 for step, _ in order if step == "start") == calls:
            all_started.set()
        # Each call waits until all 16 have started: calls that ran one after another would
        # time out here instead of finishing.
        await asyncio.wait_for(all_started.wait(), timeout=10.0)
        order.append(("finish", index))
        return await echo_expert(call)

    holder = nodes()
    holder.dataplane.register_handler("expert", gated)
    await holder.dataplane.start()

    replies = await asyncio.gather(
        *(call_expert(client, holder, {"index": torch.tensor([index])}) for index in range(calls))
    )

    assert [int(reply.tensors["index"].item()) for reply in replies] == list(range(calls))
    assert [step for step, _ in order[:calls]] == ["start"] * calls
    assert sorted(index for step, index in order if step == "finish") == list(range(calls))


async def test_call_to_wrong_server_key_times_out(nodes: NodeFactory, client: Node, server: Node) -> None:
    impostor = Identity.generate()

    with pytest.raises(PeerTimeout):
        await client.dataplane.call(
            impostor.peer_id, server.dataplane.endpoint, "expert", request_id=REQUEST_ID, record=ExpertInputSent,
            fields=EXPERT_FIELDS, tensors={"hidden": torch.ones(2)}, timeout_s=0.5,
        )

    reply = await call_expert(client, server, {"hidden": torch.ones(2)})
    assert torch.equal(reply.tensors["hidden"], torch.ones(2))
    assert server.dataplane.counters["calls_served"] == 1


@pytest.mark.parametrize("curve", [True, False], ids=["wrong_server_key", "no_curve"])
async def test_bad_client_fails_the_handshake(server: Node, curve: bool) -> None:
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    monitor = dealer.get_monitor_socket()
    try:
        if curve:
            configure_client(dealer, Identity.generate(), Identity.generate().curve_public_key)
        dealer.connect(server.dataplane.endpoint)
        failed = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}
        seen: list[int] = []
        async with asyncio.timeout(5.0):
            while not failed.intersection(seen) and zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen:
                event = zmq.utils.monitor.parse_monitor_message(await monitor.recv_multipart())
                seen.append(event["event"])
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen
        assert failed.intersection(seen)
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)
        context.term()


async def test_unknown_kind_fails_without_penalty(client: Node, server: Node) -> None:
    with pytest.raises(CallFailed) as caught:
        await client.dataplane.call(
            server.peer_id, server.dataplane.endpoint, "embeddings", request_id=REQUEST_ID, record=ExpertInputSent,
            fields=EXPERT_FIELDS, tensors={"hidden": torch.ones(2)}, timeout_s=5.0,
        )

    assert caught.value.reason == "unknown_kind"
    assert server.dataplane.counters["rejected_unknown_kind"] == 1
    assert server.rejections == []


async def test_handler_error_is_sent_back(nodes: NodeFactory, client: Node) -> None:
    async def broken(call: IncomingCall) -> Response:
        raise RuntimeError("expert weights not loaded")

    holder = nodes()
    holder.dataplane.register_handler("expert", broken)
    await holder.dataplane.start()

    with pytest.raises(CallFailed) as caught:
        await call_expert(client, holder, {"hidden": torch.ones(2)})

    assert caught.value.reason == "handler_failed"
    assert "expert weights not loaded" in caught.value.message
    assert holder.dataplane.counters["handler_failures"] == 1


async def test_slow_handler_times_out_on_both_sides(nodes: NodeFactory, client: Node) -> None:
    async def stalled(call: IncomingCall) -> Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    holder = nodes(handler_timeout_s=0.3)
    holder.dataplane.register_handler("expert", stalled)
    await holder.dataplane.start()

    with pytest.raises(PeerTimeout):
        await call_expert(client, holder, {"hidden": torch.ones(2)}, timeout_s=0.1)
    with pytest.raises(CallFailed) as caught:
        await call_expert(client, holder, {"hidden": torch.ones(2)}, timeout_s=5.0)

    assert caught.value.reason == "handler_timeout"
    assert client.dataplane.counters["call_timeouts"] == 1


async def test_cancelled_call_leaves_channel_usable(nodes: NodeFactory, client: Node, server: Node) -> None:
    task = asyncio.create_task(call_expert(client, server, {"hidden": torch.ones(2)}))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    reply = await call_expert(client, server, {"hidden": torch.full((2,), 3.0)})
    assert torch.equal(reply.tensors["hidden"], torch.full((2,), 3.0))


async def test_close_fails_calls_in_flight(nodes: NodeFactory, client: Node) -> None:
    started = asyncio.Event()

    async def stalled(call: IncomingCall) -> Response:
        started.set()
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    holder = nodes()
    holder.dataplane.register_handler("expert", stalled)
    await holder.dataplane.start()
    pending = asyncio.create_task(call_expert(client, holder, {"hidden": torch.ones(2)}))
    await asyncio.wait_for(started.wait(), 5.0)

    await client.dataplane.close()

    with pytest.raises(DataPlaneClosed):
        await pending
    with pytest.raises(DataPlaneClosed):
        await call_expert(client, holder, {"hidden": torch.ones(2)})


async def test_close_leaves_no_tasks(nodes: NodeFactory) -> None:
    before = asyncio.all_tasks()
    node = nodes()
    node.dataplane.register_handler("expert", echo_expert)
    await node.dataplane.start()
    other = nodes()
    await other.dataplane.start()
    await call_expert(other, node, {"hidden": torch.ones(2)})

    await other.dataplane.close()
    await node.dataplane.close()

    assert asyncio.all_tasks() == before


@pytest.mark.skipif(not ipv6_loopback_works(), reason="IPv6 loopback (::1) is not available on this machine")
async def test_round_trip_over_ipv6_loopback(nodes: NodeFactory) -> None:
    holder = nodes()
    holder.dataplane.register_handler("expert", echo_expert)
    endpoint = await holder.dataplane.start("tcp://[::1]:*")
    caller = nodes()
    await caller.dataplane.start("tcp://[::1]:*")
    assert endpoint.startswith("tcp://[::1]:")

    reply = await call_expert(caller, holder, {"hidden": torch.arange(6.0)})

    assert torch.equal(reply.tensors["hidden"], torch.arange(6.0))


async def test_failing_request_callback_replies_internal_error(nodes: NodeFactory, client: Node) -> None:
    def broken_lookup(request_id: str) -> bool:
        raise RuntimeError("scheduler view unavailable")

    holder = nodes(is_known_request=broken_lookup)
    holder.dataplane.register_handler("expert", echo_expert)
    await holder.dataplane.start()

    with pytest.raises(CallFailed) as caught:
        await call_expert(client, holder, {"hidden": torch.ones(2)})

    assert caught.value.reason == "internal_error"
    assert "scheduler view unavailable" in caught.value.message
    assert holder.dataplane.counters["internal_errors"] == 1


async def test_node_can_call_its_own_handler(server: Node) -> None:
    reply = await call_expert(server, server, {"hidden": torch.arange(3.0)})

    assert torch.equal(reply.tensors["hidden"], torch.arange(3.0))
    assert server.rejections == []
    assert server.acceptor.counters["own_identity_conflict"] == 0


async def test_calls_over_peer_limit_get_busy(nodes: NodeFactory, client: Node) -> None:
    release = asyncio.Event()
    started = asyncio.Condition()
    started_count = 0

    async def gated(call: IncomingCall) -> Response:
        nonlocal started_count
        async with started:
            started_count += 1
            started.notify_all()
        await asyncio.wait_for(release.wait(), timeout=10.0)
        return await echo_expert(call)

    async def wait_started(count: int) -> None:
        async with started:
            await asyncio.wait_for(started.wait_for(lambda: started_count >= count), timeout=10.0)

    holder = nodes(max_calls_per_peer=2)
    holder.dataplane.register_handler("expert", gated)
    await holder.dataplane.start()
    other = nodes()
    await other.dataplane.start()
    held = [asyncio.create_task(call_expert(client, holder, {"hidden": torch.ones(2)})) for _ in range(2)]
    await wait_started(2)

    with pytest.raises(CallFailed) as caught:
        await call_expert(client, holder, {"hidden": torch.ones(2)})
    third_party = asyncio.create_task(call_expert(other, holder, {"hidden": torch.ones(2)}))
    await wait_started(3)
    release.set()
    replies = await asyncio.gather(*held, third_party)

    assert caught.value.reason == "busy"
    assert holder.dataplane.counters["busy"] == 1
    for reply in replies:
        assert torch.equal(reply.tensors["hidden"], torch.ones(2))


async def test_call_rejects_non_record_type(client: Node, server: Node) -> None:
    with pytest.raises(ValueError, match="not a record type"):
        await client.dataplane.call(
            server.peer_id, server.dataplane.endpoint, "expert", request_id=REQUEST_ID, record=PeerLeft,
            fields={"reason": ""}, tensors={"hidden": torch.ones(2)}, timeout_s=5.0,
        )

    assert client.dataplane.counters["calls_sent"] == 0
