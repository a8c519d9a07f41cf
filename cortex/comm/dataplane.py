"""DataPlane: tensor calls between nodes over CurveZMQ-encrypted ZeroMQ DEALER/ROUTER sockets.

One DataPlane per node. It binds one ROUTER socket that serves calls to registered handlers,
and opens one DEALER channel per peer it calls. Calls to one peer share that channel and
overlap: each has an id, and replies are matched to waiting calls by that id. Each served
call runs in its own task, so a slow call does not hold up the ones behind it.

Every tensor travels with a signed record event (`cortex.comm.records`); the frame format is
in `cortex.comm.frames` and the checks on receipt in `cortex.comm.validation`. A frame that
fails a check is rejected with a logged reason, counted in `counters`, reported to the
`on_reject` hook when the sender is at fault, and replied to with an error frame when its
header was readable. Nothing a peer sends stops the node: the serve loop catches and logs
every error and keeps serving.

Zero-copy sends: chunks of 64 KiB or more are sent without a copy, so the caller's tensor
memory is read by ZeroMQ's I/O thread after `send` returns. `call` waits for the send
tracker before it returns a reply. When a call times out or is cancelled while its frames
are still queued, the channel to that peer is closed, which drops them. A handler's output
tensors are handed over to the data plane and must not be modified after it returns.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq
import zmq.asyncio

from cortex.comm.buffers import BufferPool
from cortex.comm.channel import PeerChannel
from cortex.comm.errors import CallFailed, CommError, DataPlaneClosed, FrameReason, FrameRejected, PeerTimeout
from cortex.comm.frames import (
    DTYPE_NAMES,
    Header,
    Part,
    chunk_parts,
    decode_header,
    describe,
    digest_of,
    encode_error,
    encode_message,
    joined_chunk_parts,
    tensor_bytes,
)
from cortex.comm.messages import IncomingCall, Rejection, Reply, Response
from cortex.comm.records import BATCH_FIELDS, BATCH_TENSOR_FIELDS, MAX_BATCH_TENSORS, RECORD_TYPES, TENSOR_FIELDS
from cortex.comm.sockets import ZapHandler, cancel_and_wait, configure_server
from cortex.comm.validation import Expectations, FrameLimits, curve_key_text, receive_records
from events import Acceptor, Event, Identity
from events.writer import DEFERRED_FLUSH_DELAY_S

logger = logging.getLogger(__name__)

Handler = Callable[[IncomingCall], Awaitable[Response]]
Signer = Callable[[Any, tuple[str, ...]], Event]
BatchSigner = Callable[..., Sequence[Event]]

DEFAULT_HANDLER_TIMEOUT_S = 30.0
MAX_CONCURRENT_CALLS = 256
MAX_CALLS_PER_PEER = 64
CLOSE_TIMEOUT_S = 2.0
TRACKER_TIMEOUT_S = 5.0


class DataPlane:
    """A node's tensor channels: serves registered handlers and calls other nodes' handlers.

    `sign_many(bodies, refs, defer=True)` signs the records of one message and appends them
    to the node's log in one transaction after the message is sent; pass
    `EventWriter.write_many`. `sign(body, refs)` (such as `EventWriter.write`), one record
    at a time and appended before sending, is used when `sign_many` is not given. Received
    records are checked at once and appended through `acceptor` a moment later
    (`Acceptor.accept_many(..., defer=True)`, within DEFERRED_FLUSH_DELAY_S), also after
    the reply is on its way.
    `flush_records()` appends the deferred records (default `acceptor.flush_deferred`; a
    node passes `EventWriter.flush`, which commits its own and the received ones together).
    `is_known_request(request_id)` returns whether a request may
    use this node (the Scheduler view decides). Received records are appended to the log
    through `acceptor` when one is given. `on_reject(Rejection)` is the penalty hook. Calls
    beyond `max_concurrent_calls` in flight, or `max_calls_per_peer` from one peer, get `busy`.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        sign: Signer | None = None,
        sign_many: BatchSigner | None = None,
        is_known_request: Callable[[str], bool],
        acceptor: Acceptor | None = None,
        flush_records: Callable[[], None] | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
        limits: FrameLimits = FrameLimits(),
        handler_timeout_s: float = DEFAULT_HANDLER_TIMEOUT_S,
        max_concurrent_calls: int = MAX_CONCURRENT_CALLS,
        max_calls_per_peer: int = MAX_CALLS_PER_PEER,
    ) -> None:
        self.identity = identity
        self.limits = limits
        self.counters: collections.Counter[str] = collections.Counter()
        # Seconds spent in calls that got a valid reply (`call_s`) and serving calls, from the
        # message received to the reply handed to ZeroMQ (`serve_s`): with `calls_sent` and
        # `calls_served`, the mean of each, so the network's share of a call shows.
        self.timings: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.endpoint = ""
        if sign_many is None:
            if sign is None:
                raise ValueError("a DataPlane needs sign_many (EventWriter.write_many) or sign (EventWriter.write)")
            single = sign
            sign_many = lambda bodies, refs, defer: [single(body, refs) for body in bodies]  # noqa: E731
        self._sign_many = sign_many
        self._is_known_request = is_known_request
        self._acceptor = acceptor
        self._flush_records = flush_records
        self._on_reject = on_reject
        self._handler_timeout_s = handler_timeout_s
        self._max_concurrent_calls = max_concurrent_calls
        self._max_calls_per_peer = max_calls_per_peer
        self._calls_by_peer: collections.Counter[str | None] = collections.Counter()
        self._handlers: dict[str, tuple[Handler, tuple[type, ...]]] = {}
        self._channels: dict[tuple[str, str], PeerChannel] = {}
        self._call_ids = itertools.count(1)
        self._pool = BufferPool()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._context: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._zap: ZapHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._flush_scheduled = False

    async def start(self, bind: str = "tcp://127.0.0.1:*") -> str:
        """Bind the ROUTER socket (`*` picks a free port) and start serving; return the endpoint."""
        if sys.byteorder != "little":
            raise CommError(f"the data plane sends little-endian tensor bytes, but this machine is {sys.byteorder}-endian")
        if self._context is not None:
            raise CommError("this DataPlane was already started; create a new one")
        self._context = zmq.asyncio.Context()
        self._zap = ZapHandler(self._context)
        self._router = self._context.socket(zmq.ROUTER)
        configure_server(self._router, self.identity)
        try:
            self._router.bind(bind)
        except zmq.ZMQError as error:
            await self.close()
            raise CommError(f"cannot bind the data plane to {bind}: {error}; pick another address or port") from None
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._zap.run(), name="comm-zap"),
            loop.create_task(self._serve(), name="comm-serve"),
        ]
        logger.info("data plane of %s serves on %s", self.identity.peer_id, self.endpoint)
        return self.endpoint

    def register_handler(self, kind: str, handler: Handler, accepts: tuple[type, ...] = RECORD_TYPES) -> None:
        """Serve calls of `kind` with `handler`; inputs must be records of the `accepts` types."""
        if not 0 < len(kind) <= 64:
            raise ValueError(f"handler kind {kind!r:.80} must have 1 to 64 characters")
        if kind in self._handlers:
            raise ValueError(f"a handler for kind {kind!r} is already registered")
        self._handlers[kind] = (handler, accepts)

    async def call(
        self,
        peer_id: str,
        endpoint: str,
        kind: str,
        *,
        request_id: str,
        record: type,
        fields: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        timeout_s: float,
        tensor_fields: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Reply:
        """Send `tensors` to the `kind` handler of `peer_id` at `endpoint` and return its reply.

        A one-tensor `record` type describes each tensor with its own event: `fields`,
        updated with `tensor_fields[name]` when given (a multi-expert call gives each tensor
        its `expert`), plus the fields taken from the tensor. A batch record type
        (`ExpertBatchSent`) describes the tensors of one dtype and layer in one event. Every
        record is signed with refs `(request_id,)`. Raises PeerTimeout when no valid reply
        comes within `timeout_s`, CallFailed when the peer replies with an error frame, and
        FrameRejected when its reply fails a check (the peer is then also penalized).
        """
        if self._context is None or self._closed:
            raise DataPlaneClosed("the data plane is not running; call start() first")
        started = time.perf_counter()
        channel = self._channel_for(peer_id, endpoint)
        call_id = next(self._call_ids)
        parts, trackers, input_ids = self._encode(
            "call", call_id, kind, record, fields, tensors, (request_id,), tensor_fields or {}
        )
        self.counters["calls_sent"] += 1
        try:
            async with asyncio.timeout(timeout_s):
                # `request` empties `parts` once sent: the tracker of a zero-copy frame is only
                # done after ZeroMQ and every Python reference released the frame.
                header, reply_parts = await channel.request(call_id, parts)
        except TimeoutError:
            self.counters["call_timeouts"] += 1
            await self._drop_if_queued(channel, trackers)
            raise PeerTimeout(
                f"{kind} call {call_id} to {peer_id} at {endpoint} got no reply within {timeout_s} s; "
                "retry on another replica"
            ) from None
        except asyncio.CancelledError:
            await self._drop_if_queued(channel, trackers)
            raise
        if header.op == "error":
            self.counters["call_errors"] += 1
            raise CallFailed(header.reason, f"{kind} call {call_id} to {peer_id}: {header.message}")
        expect = Expectations(
            accepts=RECORD_TYPES,
            is_known_request=self._is_known_request,
            author=peer_id,
            request_id=request_id,
            input_ids=input_ids,
        )
        try:
            outputs = receive_records(header, reply_parts, expect, self.limits, self._acceptor, self._pool)
        except FrameRejected as rejection:
            self._reject(rejection, peer_id, curve_key_text(peer_id))
            raise
        finally:
            self._schedule_flush()
        await _wait_sent(trackers)
        self.timings["call_s"] += time.perf_counter() - started
        return Reply(peer_id, request_id, tuple(outputs))

    async def disconnect(self, peer_id: str) -> None:
        """Close the channels to `peer_id` (when it left the swarm); waiting calls fail."""
        for key in [key for key in self._channels if key[0] == peer_id]:
            await self._channels.pop(key).close()

    async def close(self) -> None:
        """Stop serving, fail calls in flight, close every socket (linger 0) and the context."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait([*self._tasks, *self._handler_tasks], CLOSE_TIMEOUT_S)
        if self._acceptor is not None:
            self._flush_received()
        for channel in list(self._channels.values()):
            await channel.close()
        self._channels.clear()
        if self._router is not None:
            self._router.close(linger=0)
        if self._zap is not None:
            self._zap.close()
        if self._context is not None:
            self._context.term()
        logger.info("data plane of %s closed", self.identity.peer_id)

    async def __aenter__(self) -> DataPlane:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _channel_for(self, peer_id: str, endpoint: str) -> PeerChannel:
        channel = self._channels.get((peer_id, endpoint))
        if channel is None or channel.closed:
            assert self._context is not None
            channel = PeerChannel(self._context, self.identity, peer_id, endpoint, self.counters, self._reject_header)
            self._channels[(peer_id, endpoint)] = channel
        return channel

    async def _drop_if_queued(self, channel: PeerChannel, trackers: list[zmq.MessageTracker]) -> None:
        # Frames still queued would read the caller's tensors after the call ended, so the
        # channel is closed, which discards them. Other calls on it fail with PeerTimeout.
        if all(tracker.done for tracker in trackers):
            return
        logger.warning("closing the channel to %s: a call ended while its frames were still queued", channel.peer_id)
        self._channels.pop((channel.peer_id, channel.endpoint), None)
        await channel.close(PeerTimeout(f"the channel to {channel.peer_id} was reset after a stalled call"))

    def _encode(
        self,
        op: str,
        call_id: int,
        kind: str,
        record: type,
        fields: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        refs: tuple[str, ...],
        tensor_fields: Mapping[str, Mapping[str, Any]],
    ) -> tuple[list[Part], list[zmq.MessageTracker], tuple[str, ...]]:
        """Sign the message's records (one per tensor, or per batch group) and lay it out; return its parts, send trackers and record ids."""
        if not tensors:
            raise ValueError("a data-plane message needs at least one tensor")
        unknown = tensor_fields.keys() - tensors.keys()
        if unknown:
            raise ValueError(f"tensor_fields name tensors {sorted(unknown)} that are not in `tensors` {sorted(tensors)}")
        if record not in RECORD_TYPES:
            names = sorted(record_type.__name__ for record_type in RECORD_TYPES)
            raise ValueError(f"{record!r} is not a record type; use one of {names}")
        batch = BATCH_FIELDS.get(record)
        filled = TENSOR_FIELDS if batch is None else BATCH_TENSOR_FIELDS | batch.keys()
        per_tensor_keys = set() if batch is None else set(batch)
        overlap = filled & (fields.keys() | {key for extra in tensor_fields.values() for key in extra if key not in per_tensor_keys})
        if overlap:
            raise ValueError(f"fields {sorted(overlap)} are filled from each tensor; leave them out of `fields`")
        bodies: list[Any] = []
        all_chunks: list[list[Part]] = []
        if batch is None:
            for name, tensor in tensors.items():
                _flat, data = tensor_bytes(tensor)
                bodies.append(record(**{**fields, **tensor_fields.get(name, {})}, **describe(name, tensor, data)))
                all_chunks.append(chunk_parts(data))
        else:
            for group in _batch_groups(tensors, tensor_fields, batch):
                bodies.append(record(**{**fields, **group.fields}))
                all_chunks.append(group.chunks)
        trackers = [chunk.tracker for chunks in all_chunks for chunk in chunks if isinstance(chunk, zmq.Frame) and chunk.tracker]
        events = self._sign_many(bodies, refs, defer=True)
        records = list(zip(events, all_chunks, strict=True))
        return encode_message(op, call_id, kind, records), trackers, tuple(event.id for event in events)

    def _schedule_flush(self) -> None:
        """Append the received records to the log a moment later, with others, in one transaction."""
        if self._acceptor is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(DEFERRED_FLUSH_DELAY_S, self._flush_received)

    def _flush_received(self) -> None:
        self._flush_scheduled = False
        try:
            assert self._acceptor is not None
            (self._flush_records or self._acceptor.flush_deferred)()
        except Exception:
            self.counters["internal_errors"] += 1
            logger.exception("data plane could not append received records to the log")

    async def _serve(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart(copy=False)
            try:
                await self._on_message(frames, time.perf_counter())
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:
                # A bug in a check must not stop the node.
                self.counters["internal_errors"] += 1
                logger.exception("data plane failed to process a message; it keeps serving")

    async def _on_message(self, frames: Sequence[zmq.Frame], received: float) -> None:
        if len(frames) < 2:
            self._reject(FrameRejected(FrameReason.TRUNCATED, "message has no header part"), None, None)
            return
        routing_id, header_part = frames[0], frames[1]
        curve_key = _user_id(header_part)
        try:
            header = decode_header(header_part.buffer)
        except FrameRejected as rejection:
            self._reject(rejection, None, curve_key)
            return
        busy = self._busy_message(curve_key)
        if busy:
            self.counters["busy"] += 1
            await self._send(routing_id, encode_error(header.call_id, "busy", busy))
            return
        try:
            call = self._check_call(header, frames[2:], curve_key)
        except FrameRejected as rejection:
            self._reject(rejection, rejection.peer_id, curve_key)
            await self._send(routing_id, encode_error(header.call_id, rejection.reason.value, rejection.message))
            return
        except Exception as error:
            # A failing log store or request callback: the caller learns it now instead of timing out.
            self.counters["internal_errors"] += 1
            logger.exception("data plane failed to check call %d from CurveZMQ key %s", header.call_id, curve_key)
            await self._send(routing_id, encode_error(header.call_id, "internal_error", f"{type(error).__name__}: {error}"))
            return
        handler = self._handlers[header.kind][0]
        task = asyncio.get_running_loop().create_task(
            self._serve_call(routing_id, header.call_id, call, handler, received), name=f"comm-call-{header.call_id}"
        )
        self._handler_tasks.add(task)
        self._calls_by_peer[curve_key] += 1
        task.add_done_callback(lambda done: self._call_finished(done, curve_key))

    def _busy_message(self, curve_key: str | None) -> str:
        if len(self._handler_tasks) >= self._max_concurrent_calls:
            return f"{len(self._handler_tasks)} calls in flight, the limit is {self._max_concurrent_calls}; retry later"
        if self._calls_by_peer[curve_key] >= self._max_calls_per_peer:
            return f"this peer has {self._calls_by_peer[curve_key]} calls in flight, the limit per peer is {self._max_calls_per_peer}; retry later"
        return ""

    def _call_finished(self, task: asyncio.Task[None], curve_key: str | None) -> None:
        self._handler_tasks.discard(task)
        self._calls_by_peer[curve_key] -= 1
        if self._calls_by_peer[curve_key] <= 0:
            del self._calls_by_peer[curve_key]

    def _check_call(self, header: Header, parts: Sequence[zmq.Frame], curve_key: str | None) -> IncomingCall:
        if header.op != "call":
            raise FrameRejected(FrameReason.MALFORMED, f"expected a call, got a {header.op} frame")
        registered = self._handlers.get(header.kind)
        if registered is None:
            raise FrameRejected(
                FrameReason.UNKNOWN_KIND, f"this node serves no {header.kind!r} calls; it serves {sorted(self._handlers)}"
            )
        if curve_key is None:
            raise FrameRejected(FrameReason.UNAUTHENTICATED, "the connection has no CurveZMQ user id")
        expect = Expectations(accepts=registered[1], is_known_request=self._is_known_request, authenticated_key=curve_key)
        try:
            inputs = receive_records(header, parts, expect, self.limits, self._acceptor, self._pool)
        finally:
            self._schedule_flush()
        first = inputs[0].event
        return IncomingCall(first.author, header.kind, first.refs[0], tuple(inputs))

    async def _serve_call(
        self, routing_id: zmq.Frame, call_id: int, call: IncomingCall, handler: Handler, received: float
    ) -> None:
        served = False
        try:
            async with asyncio.timeout(self._handler_timeout_s):
                response = await handler(call)
            refs = (call.request_id, *(event.id for event in call.events))
            parts, _trackers, _ids = self._encode(
                "reply", call_id, "", response.record, response.fields, response.tensors, refs, response.tensor_fields
            )
            served = True
        except TimeoutError:
            self.counters["handler_timeouts"] += 1
            message = f"the {call.kind} handler did not finish within {self._handler_timeout_s} s"
            logger.warning("%s call %d from %s: %s", call.kind, call_id, call.peer_id, message)
            parts = encode_error(call_id, "handler_timeout", message)
        except Exception as error:
            self.counters["handler_failures"] += 1
            logger.exception("%s handler failed on call %d from %s", call.kind, call_id, call.peer_id)
            parts = encode_error(call_id, "handler_failed", f"{type(error).__name__}: {error}")
        await self._send(routing_id, parts)
        if served:
            # Counted with its time, so that serve_s / calls_served is the mean of served calls.
            self.counters["calls_served"] += 1
            self.timings["serve_s"] += time.perf_counter() - received

    async def _send(self, routing_id: zmq.Frame, parts: Sequence[Part]) -> None:
        assert self._router is not None
        try:
            # A ROUTER without ZMQ_ROUTER_MANDATORY drops a message to a peer that left or is at
            # its high-water mark instead of blocking (zmq_socket(3), libzmq 4.3).
            await self._router.send_multipart([routing_id, *parts], copy=False)
        except zmq.ZMQError as error:
            logger.warning("could not send a reply: %s", error)

    def _reject_header(self, peer_id: str, rejection: FrameRejected) -> None:
        self._reject(rejection, peer_id, curve_key_text(peer_id))

    def _reject(self, rejection: FrameRejected, peer_id: str | None, curve_key: str | None) -> None:
        reason = rejection.reason
        self.counters["rejected"] += 1
        self.counters[f"rejected_{reason.value}"] += 1
        count = self.counters[f"rejected_{reason.value}"]
        # Log the 1st, 2nd, 4th, 8th, ... rejection per reason, so a flood cannot fill the log.
        level = logging.WARNING if count & (count - 1) == 0 else logging.DEBUG
        sender = peer_id or f"CurveZMQ key {curve_key}"
        logger.log(level, "rejected a frame from %s (%d so far for %s): %s", sender, count, reason.value, rejection)
        if rejection.evidence and self._acceptor is not None:
            self._flush_received()  # the evidence is named as stored: store it now, not a moment later
        if not reason.penalized or self._on_reject is None:
            return
        try:
            self._on_reject(Rejection(reason, rejection.message, peer_id, curve_key, rejection.evidence))
        except Exception:
            logger.exception("the penalty hook failed on a %s rejection", reason.value)


@dataclass(frozen=True, slots=True)
class _BatchGroup:
    """The tensors of one batch record: its fields filled from the tensors, and their chunk parts."""

    fields: dict[str, Any]
    chunks: list[Part]


def _batch_groups(
    tensors: Mapping[str, torch.Tensor], tensor_fields: Mapping[str, Mapping[str, Any]], batch: Mapping[str, str]
) -> list[_BatchGroup]:
    """Group tensors into batch records: one per dtype and per set of shared extra fields, in order.

    A tensor's per-tensor fields (`batch`, such as `expert`) go into the record's lists. Its
    other `tensor_fields` must be equal for the tensors of one record, so a different value
    starts another record. A record that already lists MAX_BATCH_TENSORS tensors does too.
    Small tensors of a record are joined into one part.
    """
    # (dtype, shared fields) -> the records of that group, each a list of (name, tensor, bytes, tensor_fields).
    groups: dict[tuple[str, tuple[tuple[str, Any], ...]], list[list[tuple[str, torch.Tensor, memoryview, Mapping[str, Any]]]]] = {}
    for name, tensor in tensors.items():
        extra = tensor_fields.get(name, {})
        shared = tuple(sorted((key, value) for key, value in extra.items() if key not in batch))
        _flat, data = tensor_bytes(tensor)
        records = groups.setdefault((DTYPE_NAMES[tensor.dtype], shared), [[]])
        if len(records[-1]) >= MAX_BATCH_TENSORS:
            records.append([])
        records[-1].append((name, tensor, data, extra))
    return [_batch_group(dtype, shared, members, batch) for (dtype, shared), records in groups.items() for members in records]


def _batch_group(
    dtype: str, shared: tuple[tuple[str, Any], ...], members: list[tuple[str, torch.Tensor, memoryview, Mapping[str, Any]]],
    batch: Mapping[str, str],
) -> _BatchGroup:
    """Fill one batch record's fields from its tensors (`members`: name, tensor, bytes, tensor_fields)."""
    datas = [data for _name, _tensor, data, _extra in members]
    group_fields: dict[str, Any] = dict(shared)
    for single, plural in batch.items():
        missing = [name for name, _tensor, _data, extra in members if single not in extra]
        if missing:
            raise ValueError(f"tensor_fields must give {single!r} for every tensor of a batch record; missing for {missing}")
        group_fields[plural] = tuple(extra[single] for _name, _tensor, _data, extra in members)
    group_fields.update(
        names=tuple(name for name, _tensor, _data, _extra in members),
        dtype=dtype,
        shapes=tuple(tuple(tensor.shape) for _name, tensor, _data, _extra in members),
        digest=digest_of(datas),
        nbytes=sum(data.nbytes for data in datas),
    )
    return _BatchGroup(group_fields, joined_chunk_parts(datas))


def _user_id(frame: zmq.Frame) -> str | None:
    """Return the ZAP user id of the connection a frame came on: the client's CurveZMQ key."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user_id if isinstance(user_id, str) and user_id else None


async def _wait_sent(trackers: list[zmq.MessageTracker]) -> None:
    """Wait until ZeroMQ released every zero-copy frame, so the caller may modify its tensors."""
    pending = [tracker for tracker in trackers if not tracker.done]
    if not pending:
        return
    tracker = zmq.MessageTracker(*pending)
    try:
        await asyncio.to_thread(tracker.wait, TRACKER_TIMEOUT_S)
    except zmq.NotDone:
        logger.warning("ZeroMQ still holds sent frames %.1f s after the reply arrived", TRACKER_TIMEOUT_S)
