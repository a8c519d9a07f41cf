"""Helpers for data-plane tests: nodes with real identities, SQLite logs and sockets on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
import zmq.asyncio

from cortex.comm import (
    CHUNK_BYTES,
    DataPlane,
    ExpertBatchProduced,
    ExpertBatchSent,
    ExpertInputSent,
    ExpertOutputProduced,
    FrameLimits,
    IncomingCall,
    Rejection,
    Response,
)
from cortex.comm.frames import DTYPE_NAMES, Header, decode_header, encode_header
from cortex.comm.sockets import configure_client
from events import Acceptor, Event, EventWriter, Identity, LogStore, sign_event, wall_clock_ms

REQUEST_ID = "ab" * 32
MODEL_ID = "test-model"
EXPERT_FIELDS = {"model_id": MODEL_ID, "step": 3, "layer": 1, "expert": 5}


@dataclass
class Node:
    """One data-plane node with its own identity, log, known requests and rejection list."""

    identity: Identity
    store: LogStore
    acceptor: Acceptor
    writer: EventWriter
    dataplane: DataPlane
    known_requests: set[str] = field(default_factory=lambda: {REQUEST_ID})
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def make_node(
    directory: Path,
    limits: FrameLimits = FrameLimits(),
    handler_timeout_s: float = 10.0,
    is_known_request: Callable[[str], bool] | None = None,
    on_reject: Callable[[Rejection], None] | None = None,
    max_calls_per_peer: int = 64,
) -> Node:
    """Build a node whose data plane signs with a real EventWriter and logs through an Acceptor.

    By default the node accepts only REQUEST_ID and appends every rejection to `rejections`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    store = LogStore(directory / "events.db")
    acceptor = Acceptor(store, own_peer_id=identity.peer_id)
    writer = EventWriter(identity, acceptor)
    known: set[str] = {REQUEST_ID}
    rejections: list[Rejection] = []
    dataplane = DataPlane(
        identity,
        sign_many=writer.write_many,
        is_known_request=is_known_request or known.__contains__,
        acceptor=acceptor,
        on_reject=on_reject or rejections.append,
        limits=limits,
        handler_timeout_s=handler_timeout_s,
        max_calls_per_peer=max_calls_per_peer,
    )
    return Node(identity, store, acceptor, writer, dataplane, known, rejections)


async def echo_expert(call: IncomingCall) -> Response:
    """Return every input tensor unchanged: ExpertOutputProduced records, or one ExpertBatchProduced for batch inputs."""
    first = call.inputs[0].fields
    fields = {"model_id": first["model_id"], "step": first["step"]}
    per_tensor = {received.name: {"layer": received.fields["layer"], "expert": received.fields["expert"]} for received in call.inputs}
    record = ExpertBatchProduced if isinstance(call.inputs[0].event.body, ExpertBatchSent) else ExpertOutputProduced
    return Response(record, fields, {name: tensor.clone() for name, tensor in call.tensors.items()}, per_tensor)


NodeFactory = Callable[..., Node]


def ipv6_loopback_works() -> bool:
    import socket

    if not socket.has_ipv6 or os.environ.get("CORTEX_NO_IPV6"):
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class RecordSigner:
    """Signs record events for hand-made messages with fresh sequence numbers."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.seq = 0

    def sign(self, body: object, refs: tuple[str, ...] = (REQUEST_ID,)) -> Event:
        self.seq += 1
        return sign_event(self.identity, body, seq=self.seq, lamport=self.seq, time_ms=wall_clock_ms(), refs=refs)


def expert_input(
    tensor_name: str, data: bytes, tensor_dtype: str, tensor_shape: tuple[int, ...], **overrides: object
) -> ExpertInputSent:
    """An ExpertInputSent record that describes `data`, with any field overridden."""
    fields: dict[str, object] = {
        **EXPERT_FIELDS,
        "name": tensor_name,
        "dtype": tensor_dtype,
        "shape": tensor_shape,
        "digest": hashlib.blake2b(data, digest_size=32).hexdigest(),
        "nbytes": len(data),
    }
    fields.update(overrides)
    return ExpertInputSent(**fields)  # type: ignore[arg-type]


def build_call(
    signer: RecordSigner,
    call_id: int,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str = "expert",
    chunk_bytes: int = CHUNK_BYTES,
    refs: tuple[str, ...] = (REQUEST_ID,),
    **overrides: object,
) -> list[bytes]:
    """Lay out a call by hand: header, then each record and its chunks, all as mutable bytes."""
    records: list[tuple[bytes, list[bytes]]] = []
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        body = expert_input(name, data, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), **overrides)
        chunks = [data[offset : offset + chunk_bytes] for offset in range(0, len(data), chunk_bytes)] or [b""]
        records.append((signer.sign(body, refs).wire, chunks))
    parts = [encode_header("call", call_id, kind=kind, chunks=[len(chunks) for _wire, chunks in records])]
    for wire, chunks in records:
        parts.append(wire)
        parts.extend(chunks)
    return parts


class RawClient:
    """A CurveZMQ DEALER that sends hand-made messages to a node and reads the raw replies."""

    def __init__(self, identity: Identity, server: Node) -> None:
        self.identity = identity
        self.signer = RecordSigner(identity)
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        configure_client(self._socket, identity, server.identity.curve_public_key)
        self._socket.connect(server.dataplane.endpoint)
        self._call_ids = itertools.count(1000)

    @property
    def curve_key(self) -> str:
        return self.identity.curve_public_key.decode()

    async def send(self, parts: list[bytes]) -> None:
        await self._socket.send_multipart(parts)

    async def receive(self, timeout_s: float = 5.0) -> tuple[Header, list[zmq.Frame]]:
        async with asyncio.timeout(timeout_s):
            frames = await self._socket.recv_multipart(copy=False)
        return decode_header(frames[0].buffer), frames[1:]

    async def good_call(self) -> Header:
        """Send a valid call and return its reply header, skipping error replies to earlier calls."""
        call_id = next(self._call_ids)
        await self.send(build_call(self.signer, call_id, {"hidden": torch.arange(4.0)}))
        while True:
            header, _frames = await self.receive()
            if header.call_id == call_id:
                return header

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
