"""Helpers for data-plane tests: nodes with real identities, SQLite logs and sockets on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cortex.comm import DataPlane, ExpertOutputProduced, FrameLimits, IncomingCall, Rejection, Response
from events import Acceptor, EventWriter, Identity, LogStore

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


def make_node(directory: Path, limits: FrameLimits = FrameLimits(), handler_timeout_s: float = 10.0) -> Node:
    """Build a node whose data plane signs with a real EventWriter and logs through an Acceptor."""
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    store = LogStore(directory / "events.db")
    acceptor = Acceptor(store, own_peer_id=identity.peer_id)
    writer = EventWriter(identity, acceptor)
    known: set[str] = {REQUEST_ID}
    rejections: list[Rejection] = []
    dataplane = DataPlane(
        identity,
        sign=writer.write,
        is_known_request=known.__contains__,
        acceptor=acceptor,
        on_reject=rejections.append,
        limits=limits,
        handler_timeout_s=handler_timeout_s,
    )
    return Node(identity, store, acceptor, writer, dataplane, known, rejections)


async def echo_expert(call: IncomingCall) -> Response:
    """Return every input tensor unchanged as an ExpertOutputProduced record."""
    body = call.inputs[0].event.body
    fields = {"model_id": body.model_id, "step": body.step, "layer": body.layer, "expert": body.expert}
    return Response(ExpertOutputProduced, fields, {name: tensor.clone() for name, tensor in call.tensors.items()})


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
