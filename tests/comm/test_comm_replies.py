"""Replies from a misbehaving server: the caller rejects them, counts them and penalizes the server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import torch
import zmq
import zmq.asyncio
from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node, RecordSigner, build_call

from cortex.comm import ExpertInputSent, FrameReason, FrameRejected, PeerTimeout, Reply
from cortex.comm.frames import decode_header, encode_header, split_records
from cortex.comm.sockets import configure_server
from events import Identity, parse_event

# (call id, the server's signer, refs a correct reply carries) -> reply parts
Forge = Callable[[int, RecordSigner, tuple[str, ...]], list[bytes]]


class FakeServer:
    """A CurveZMQ ROUTER with a real identity that replies to each call with a forged reply."""

    def __init__(self, forge: Forge) -> None:
        self.identity = Identity.generate()
        self.signer = RecordSigner(self.identity)
        self._forge = forge
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        configure_server(self._socket, self.identity)
        self._socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            routing_id, header, *rest = await self._socket.recv_multipart()
            parsed = decode_header(header)
            records = split_records(parsed, [zmq.Frame(part) for part in rest])
            refs = (REQUEST_ID, *(parse_event(event.bytes).id for event, _chunks in records))
            await self._socket.send_multipart([routing_id, *self._forge(parsed.call_id, self.signer, refs)])

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close(linger=0)
        self._context.term()


def as_reply(parts: list[bytes], call_id: int) -> list[bytes]:
    chunks = decode_header(parts[0]).chunks
    return [encode_header("reply", call_id, chunks=chunks), *parts[1:]]


def correct(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    return as_reply(build_call(signer, call_id, {"out": torch.ones(4)}, refs=refs), call_id)


def tampered_bytes(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    parts = correct(call_id, signer, refs)
    parts[2] = bytes(len(parts[2]))
    return parts


def signed_by_another_peer(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    return correct(call_id, RecordSigner(Identity.generate()), refs)


def for_another_request(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    return correct(call_id, signer, ("cd" * 32, *refs[1:]))


def not_linked_to_inputs(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    return correct(call_id, signer, refs[:1])


def unreadable_header(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    return [b"garbage"]


def reply_to_another_call(call_id: int, signer: RecordSigner, refs: tuple[str, ...]) -> list[bytes]:
    return correct(call_id + 1000, signer, refs)


@pytest.fixture
async def fake_servers() -> AsyncIterator[Callable[[Forge], FakeServer]]:
    started: list[FakeServer] = []

    def start(forge: Forge) -> FakeServer:
        started.append(FakeServer(forge))
        return started[-1]

    yield start
    for fake in started:
        await fake.close()


async def call_fake(client: Node, fake: FakeServer, timeout_s: float = 5.0) -> Reply:
    return await client.dataplane.call(
        fake.identity.peer_id, fake.endpoint, "expert", request_id=REQUEST_ID, record=ExpertInputSent,
        fields=EXPERT_FIELDS, tensors={"hidden": torch.ones(4)}, timeout_s=timeout_s,
    )


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (tampered_bytes, FrameReason.BAD_DIGEST),
        (signed_by_another_peer, FrameReason.AUTHOR_MISMATCH),
        (for_another_request, FrameReason.UNKNOWN_REQUEST),
        (not_linked_to_inputs, FrameReason.UNLINKED_REPLY),
    ],
    ids=["tampered_bytes", "signed_by_another_peer", "for_another_request", "not_linked_to_inputs"],
)
async def test_forged_reply_is_rejected(client: Node, fake_servers: Callable[[Forge], FakeServer], forge: Forge, reason: FrameReason) -> None:
    fake = fake_servers(forge)

    with pytest.raises(FrameRejected) as caught:
        await call_fake(client, fake)

    assert caught.value.reason is reason
    assert client.dataplane.counters[f"rejected_{reason.value}"] == 1
    assert [rejection.peer_id for rejection in client.rejections] == [fake.identity.peer_id]
    assert client.rejections[0].curve_key == fake.identity.curve_public_key.decode()


async def test_correct_fake_reply_is_accepted(client: Node, fake_servers: Callable[[Forge], FakeServer]) -> None:
    fake = fake_servers(correct)

    reply = await call_fake(client, fake)

    assert torch.equal(reply.tensors["out"], torch.ones(4))
    assert client.rejections == []


async def test_unreadable_reply_header_times_out_and_penalizes(client: Node, fake_servers: Callable[[Forge], FakeServer]) -> None:
    fake = fake_servers(unreadable_header)

    with pytest.raises(PeerTimeout):
        await call_fake(client, fake, timeout_s=0.5)

    assert client.dataplane.counters["rejected_malformed"] == 1
    assert client.rejections[0].peer_id == fake.identity.peer_id


async def test_reply_to_unknown_call_is_dropped_as_late(client: Node, fake_servers: Callable[[Forge], FakeServer]) -> None:
    fake = fake_servers(reply_to_another_call)

    with pytest.raises(PeerTimeout):
        await call_fake(client, fake, timeout_s=0.5)

    assert client.dataplane.counters["late_replies"] == 1
    assert client.rejections == []
