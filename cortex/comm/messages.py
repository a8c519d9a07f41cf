"""Values passed between the data plane and its users: tensors with records, calls, replies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cortex.comm.errors import FrameReason
from events import Event


@dataclass(frozen=True, slots=True)
class ReceivedTensor:
    """A received tensor, the signed record event that describes it, and its own record fields.

    `fields` are the record's fields for this tensor other than its description, such as
    `layer` and `expert` (a batch record describes several tensors, each with its expert).
    A single-chunk tensor is a view of the received ZeroMQ frame, a larger one lives in a
    pooled buffer that is reused only after every view of it is gone. Clone it before
    mutating it in place if the bytes must stay equal to the record.
    """

    name: str
    tensor: torch.Tensor
    event: Event
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """A validated call that a handler serves: who sent it, for which request, with what tensors."""

    peer_id: str
    kind: str
    request_id: str
    inputs: tuple[ReceivedTensor, ...]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The input tensors by name."""
        return {received.name: received.tensor for received in self.inputs}

    @property
    def events(self) -> tuple[Event, ...]:
        """The record events of the inputs, each once, in order."""
        return _distinct_events(self.inputs)


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler returns: the record type and fields for its outputs, and the tensors.

    `fields` are the record fields other than the ones filled from each tensor (name, dtype,
    shape, digest, nbytes). `tensor_fields[name]` updates them for one tensor, as a
    multi-expert reply names each output's expert. The handler hands the tensors over: it
    must not modify them after returning, because they are sent without a copy.
    """

    record: type
    fields: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    tensor_fields: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """The validated reply to a call."""

    peer_id: str
    request_id: str
    outputs: tuple[ReceivedTensor, ...]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The output tensors by name."""
        return {received.name: received.tensor for received in self.outputs}

    @property
    def events(self) -> tuple[Event, ...]:
        """The record events of the outputs, each once, in order."""
        return _distinct_events(self.outputs)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A rejected frame, as given to the penalty hook.

    `peer_id` is the peer at fault when it is known: the called peer for a reply, or the
    author of a call whose author matched its CurveZMQ key. `curve_key` is the sender's
    authenticated CurveZMQ public key (Z85), which the node can map to a peer through the
    `curve_public_key` of its `PeerJoined` event. `evidence` lists the ids of the sender's
    signed records that this node stored and that show the fault, when there are any.
    """

    reason: FrameReason
    message: str
    peer_id: str | None
    curve_key: str | None
    evidence: tuple[str, ...] = ()


def _distinct_events(received: tuple[ReceivedTensor, ...]) -> tuple[Event, ...]:
    # A batch record describes several tensors: its event appears once.
    return tuple({item.event.id: item.event for item in received}.values())
