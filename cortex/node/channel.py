"""A minimal tensor RPC over ZeroMQ DEALER/ROUTER with CurveZMQ, used until `cortex.comm` lands.

NOTE: the data plane proper (signed tensor records, chunked zero-copy frames, sender
penalties) is `cortex.comm`; this module is the smallest call/handler layer the node
needs to serve blocks and experts, and `Channel` is the only place that would change.

Message frames, both directions:

    frame 0: JSON header {"id": int, "method": str, "meta": {...}, "ok": bool, "error": str,
             "tensors": [{"dtype": "float32", "shape": [T, D]}, ...]}
    frame 1..n: the raw bytes of each tensor, C-contiguous, in header order

Every received tensor is validated before use: its dtype is in `ALLOWED_DTYPES`, its
shape times the item size equals the frame length, and the message stays under
`MAX_MESSAGE_BYTES`. A bad message gets an error reply and a logged warning; it never
crashes the node.

Keys: the server's CurveZMQ key pair is the X25519 form of the node's Ed25519 identity,
and a client derives a peer's server key from its peer id, so the peer id alone
authenticates the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import torch
import zmq
import zmq.asyncio

from cortex.driver.errors import CallFailed
from events.identity import Identity, curve_public_key_from_peer_id

logger = logging.getLogger(__name__)

ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024

Meta = dict[str, Any]
Handler = Callable[[str, Meta, list[torch.Tensor]], Awaitable[tuple[Meta, list[torch.Tensor]]]]


class InvalidMessage(ValueError):
    """A message whose header or tensor frames fail validation."""


def encode_message(header: Meta, tensors: list[torch.Tensor]) -> list[bytes | memoryview]:
    """Return the frames of a message: the JSON header, then each tensor's raw bytes."""
    specs = []
    frames: list[bytes | memoryview] = []
    for tensor in tensors:
        contiguous = tensor.detach().contiguous().cpu()
        specs.append({"dtype": str(contiguous.dtype).removeprefix("torch."), "shape": list(contiguous.shape)})
        frames.append(contiguous.view(torch.uint8).numpy().data if contiguous.numel() else b"")
    return [orjson.dumps({**header, "tensors": specs}), *frames]


def decode_message(frames: list[bytes]) -> tuple[Meta, list[torch.Tensor]]:
    """Parse and validate a message's frames; raise InvalidMessage naming what is wrong."""
    if not frames or len(frames[0]) > MAX_HEADER_BYTES:
        raise InvalidMessage(f"a message needs a JSON header frame of at most {MAX_HEADER_BYTES} bytes")
    total = sum(len(frame) for frame in frames)
    if total > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message of {total} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        header = orjson.loads(frames[0])
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"header is not JSON: {error}") from None
    specs = header.get("tensors") if isinstance(header, dict) else None
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise InvalidMessage(f"header lists {specs!r} tensors but the message has {len(frames) - 1} tensor frames")
    tensors = [_decode_tensor(spec, frame) for spec, frame in zip(specs, frames[1:], strict=True)]
    return header, tensors


def _decode_tensor(spec: Any, frame: bytes) -> torch.Tensor:
    dtype = ALLOWED_DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) else None
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if dtype is None:
        raise InvalidMessage(f"tensor dtype {spec!r} is not allowed; allowed: {', '.join(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise InvalidMessage(f"tensor shape {shape!r} is not a list of non-negative integers")
    numel = 1
    for size in shape:
        numel *= size
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if expected != len(frame):
        raise InvalidMessage(f"tensor {spec['dtype']}{shape} needs {expected} bytes, the frame has {len(frame)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(frame), dtype=dtype).view(shape)


class Channel:
    """This node's ROUTER (serving calls) and one DEALER per peer (making calls)."""

    def __init__(self, identity: Identity, listen: str) -> None:
        self.identity = identity
        self.context = zmq.asyncio.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.curve_server = True
        self.router.curve_secretkey = identity.curve_secret_key
        self.router.curve_publickey = identity.curve_public_key
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(listen)
        self.endpoint: str = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handlers: dict[str, Handler] = {}
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._pending: dict[int, tuple[str, asyncio.Future[tuple[Meta, list[torch.Tensor]]]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rejected_messages = 0
        self._monitors: list[zmq.asyncio.Socket] = []

    def register(self, method: str, handler: Handler) -> None:
        self.handlers[method] = handler

    async def serve(self) -> None:
        """Receive calls until cancelled; each call is handled in its own task."""
        while True:
            frames = await self.router.recv_multipart(copy=True)
            task = asyncio.create_task(self._handle(frames[0], frames[1:]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, route: bytes, frames: list[bytes]) -> None:
        call_id = None
        try:
            header, tensors = decode_message(frames)
            call_id = header.get("id")
            handler = self.handlers.get(header.get("method", ""))
            if handler is None:
                raise InvalidMessage(f"unknown method {header.get('method')!r}; known: {', '.join(self.handlers)}")
            meta, outputs = await handler(str(header["method"]), header.get("meta") or {}, tensors)
            reply = encode_message({"id": call_id, "ok": True, "meta": meta}, outputs)
        except InvalidMessage as error:
            self.rejected_messages += 1
            logger.warning("rejected a data-plane message: %s", error)
            reply = encode_message({"id": call_id, "ok": False, "error": f"invalid message: {error}"}, [])
        except Exception as error:  # noqa: BLE001 - a failed call is reported to the caller, who retries elsewhere
            logger.warning("call %s failed: %r", call_id, error)
            reply = encode_message({"id": call_id, "ok": False, "error": repr(error)}, [])
        with contextlib.suppress(zmq.ZMQError):
            await self.router.send_multipart([route, *reply], copy=True)

    def _dealer(self, peer: str, endpoint: str) -> zmq.asyncio.Socket:
        dealer = self._dealers.get(peer)
        if dealer is None:
            dealer = self.context.socket(zmq.DEALER)
            dealer.curve_serverkey = curve_public_key_from_peer_id(peer)
            dealer.curve_publickey = self.identity.curve_public_key
            dealer.curve_secretkey = self.identity.curve_secret_key
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(endpoint)
            self._dealers[peer] = dealer
            for coroutine in (self._receive_replies(peer, dealer), self._watch_disconnects(peer, dealer)):
                task = asyncio.create_task(coroutine)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return dealer

    async def _receive_replies(self, peer: str, dealer: zmq.asyncio.Socket) -> None:
        while True:
            frames = await dealer.recv_multipart(copy=True)
            try:
                header, tensors = decode_message(frames)
            except InvalidMessage as error:
                self.rejected_messages += 1
                logger.warning("rejected a reply from %s: %s", peer, error)
                continue
            entry = self._pending.pop(header.get("id"), None)
            if entry is None or entry[1].done():
                continue
            if header.get("ok"):
                entry[1].set_result((header.get("meta") or {}, tensors))
            else:
                entry[1].set_exception(CallFailed(peer, "call", str(header.get("error"))))

    async def _watch_disconnects(self, peer: str, dealer: zmq.asyncio.Socket) -> None:
        """Fail the calls in flight to `peer` as soon as its connection drops (a crashed process)."""
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitors.append(monitor)
        while True:
            await monitor.recv_multipart()
            logger.warning("data-plane connection to %s dropped; failing its calls in flight", peer)
            self.fail_peer(peer, "connection dropped")

    async def call(
        self, peer: str, endpoint: str, method: str, meta: Meta, tensors: list[torch.Tensor], timeout: float
    ) -> tuple[Meta, list[torch.Tensor]]:
        """Call `method` on `peer` and return its reply; raise CallFailed on error or timeout."""
        call_id = next(self._ids)
        future: asyncio.Future[tuple[Meta, list[torch.Tensor]]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (peer, future)
        try:
            await self._dealer(peer, endpoint).send_multipart(
                encode_message({"id": call_id, "method": method, "meta": meta}, tensors), copy=True
            )
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise CallFailed(peer, method, f"no reply within {timeout} s") from None
        except CallFailed as error:
            raise CallFailed(peer, method, error.reason) from None
        finally:
            self._pending.pop(call_id, None)

    def fail_peer(self, peer: str, reason: str) -> None:
        """Fail every call in flight to `peer` now (it left or stopped answering)."""
        for call_id, (target, future) in list(self._pending.items()):
            if target == peer and not future.done():
                future.set_exception(CallFailed(peer, "call", reason))
                self._pending.pop(call_id, None)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for monitor in self._monitors:
            monitor.close(linger=0)
        for dealer in self._dealers.values():
            dealer.close(linger=0)
        self.router.close(linger=0)
        self.context.term()
