"""Round-trip measurements: the raw ZeroMQ floor, the signed-record floor, and any data-plane call, for the benches.

`measure_raw_round_trip` sends a payload from a DEALER to a ROUTER that echoes it, over the
same CurveZMQ sockets, ZAP handler and chunking the data plane uses, but with no events and
no checks. It is the floor a data-plane call is compared with.

`measure_signed_round_trip` is the same exchange with the least work a call with signed
records needs: each side signs a record that describes the tensor bytes it sends
(`ExpertInputSent`, then `ExpertOutputProduced`), and checks the other's on arrival (decode,
Ed25519 signature, BLAKE2b digest of the bytes). It has no log, no router and no handler, so
it shows how much of a call's time the records cost by themselves.

`measure_local_call_round_trip` times whole `DataPlane` calls between two data planes in this
process, each with its own identity and SQLite log (`EventWriter`, `Acceptor`), to a handler
that returns its inputs. It is a swarm's expert call without the other processes: the records
signed, checked and logged, and the data plane's own work, with no model compute.

The functions only measure and return numbers. Judging them is up to the caller.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
import zmq.asyncio

from cortex.comm.dataplane import DataPlane
from cortex.comm.frames import chunk_parts, digest_of, encode_header
from cortex.comm.messages import IncomingCall, Response
from cortex.comm.records import ExpertBatchProduced, ExpertBatchSent, ExpertInputSent, ExpertOutputProduced
from cortex.comm.sockets import ZapHandler, cancel_and_wait, configure_client, configure_server
from events import Acceptor, Event, EventWriter, Identity, LogStore, parse_event, sign_event, verify_event, wall_clock_ms

# The request id in the signed exchanges' records. No such request exists, and no check reads it.
_ROUND_TRIP_REQUEST = "00" * 32


@dataclass(frozen=True, slots=True)
class RoundTripStats:
    """Round-trip times of `rounds` exchanges of `payload_bytes` each, in microseconds."""

    payload_bytes: int
    samples_us: tuple[float, ...]

    @property
    def rounds(self) -> int:
        return len(self.samples_us)

    @property
    def min_us(self) -> float:
        return min(self.samples_us)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def p90_us(self) -> float:
        ordered = sorted(self.samples_us)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    @property
    def mean_us(self) -> float:
        return statistics.fmean(self.samples_us)


async def measure_raw_round_trip(
    *, payload_bytes: int = 64 * 1024, rounds: int = 200, warmup: int = 20, host: str = "127.0.0.1", timeout_s: float = 30.0
) -> RoundTripStats:
    """Measure DEALER to ROUTER echo round trips over CurveZMQ on `host` (such as "[::1]").

    Raises TimeoutError if the whole measurement takes longer than `timeout_s`.
    """
    return await _round_trips(payload_bytes, rounds, warmup, host, timeout_s, signed=False)


async def measure_signed_round_trip(
    *, payload_bytes: int = 64 * 1024, rounds: int = 200, warmup: int = 20, host: str = "127.0.0.1", timeout_s: float = 30.0
) -> RoundTripStats:
    """Measure the raw round trips with a signed record per message, checked on arrival (see the module docs).

    `payload_bytes` must be a multiple of 4: the records describe float32 tensors. Raises
    TimeoutError if the whole measurement takes longer than `timeout_s`, and EventRejected
    or ValueError if a record fails its check.
    """
    if payload_bytes % 4:
        raise ValueError(f"payload_bytes must be a multiple of 4 (float32 items), got {payload_bytes}")
    return await _round_trips(payload_bytes, rounds, warmup, host, timeout_s, signed=True)


async def _round_trips(payload_bytes: int, rounds: int, warmup: int, host: str, timeout_s: float, *, signed: bool) -> RoundTripStats:
    if rounds < 1 or warmup < 0 or payload_bytes < 0:
        raise ValueError(f"need rounds >= 1, warmup >= 0, payload_bytes >= 0; got {rounds}, {warmup}, {payload_bytes}")
    server, client = Identity.generate(), Identity.generate()
    context = zmq.asyncio.Context()
    zap = ZapHandler(context)
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    tasks: list[asyncio.Task[None]] = []
    try:
        configure_server(router, server)
        router.bind(f"tcp://{host}:*")
        configure_client(dealer, client, server.curve_public_key)
        dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
        loop = asyncio.get_running_loop()
        echo = _signed_echo(router, server, client.peer_id) if signed else _echo(router)
        tasks = [loop.create_task(zap.run(), name="raw-zap"), loop.create_task(echo, name="raw-echo")]
        payload = memoryview(bytearray(b"\x5a" * payload_bytes))
        samples: list[float] = []
        async with asyncio.timeout(timeout_s):
            for index in range(warmup + rounds):
                started = time.perf_counter_ns()
                parts = [encode_header("call", index, kind="raw", chunks=[1]), *chunk_parts(payload)]
                if signed:
                    record = _sign_record(client, ExpertInputSent, index, payload, refs=(_ROUND_TRIP_REQUEST,))
                    parts.insert(1, record.wire)
                await dealer.send_multipart(parts, copy=False)
                reply = await dealer.recv_multipart(copy=False)
                if signed:
                    _check_record(reply[1].bytes, server.peer_id, reply[2:])
                if index >= warmup:
                    samples.append((time.perf_counter_ns() - started) / 1000)
        return RoundTripStats(payload_bytes, tuple(samples))
    finally:
        await cancel_and_wait(tasks, 2.0)
        dealer.close(linger=0)
        router.close(linger=0)
        zap.close()
        context.term()


async def measure_call_round_trip(
    call: Callable[[], Awaitable[object]], *, payload_bytes: int, rounds: int = 200, warmup: int = 20
) -> RoundTripStats:
    """Time `rounds` sequential awaits of `call` (a data-plane call, say) after `warmup` untimed ones."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0; got {rounds} and {warmup}")
    samples: list[float] = []
    for index in range(warmup + rounds):
        started = time.perf_counter_ns()
        await call()
        if index >= warmup:
            samples.append((time.perf_counter_ns() - started) / 1000)
    return RoundTripStats(payload_bytes, tuple(samples))


async def measure_local_call_round_trip(
    folder: Path, *, hidden_size: int, experts: int = 2, rounds: int = 200, warmup: int = 20, timeout_s: float = 60.0
) -> RoundTripStats:
    """Time multi-expert calls of one token's hidden state (`hidden_size` float32) to `experts` experts, in process.

    The two logs are created in `folder`/caller and `folder`/server, which must not have them yet. Raises
    TimeoutError if the whole measurement takes longer than `timeout_s`.
    """
    async def echo(call: IncomingCall) -> Response:
        per_tensor = {received.name: {"layer": received.fields["layer"], "expert": received.fields["expert"]} for received in call.inputs}
        fields = {"model_id": call.inputs[0].fields["model_id"], "step": call.inputs[0].fields["step"]}
        return Response(ExpertBatchProduced, fields, {name: tensor.clone() for name, tensor in call.tensors.items()}, per_tensor)

    planes: list[DataPlane] = []
    closers: list[Callable[[], None]] = []
    try:
        for name in ("caller", "server"):
            identity = Identity.generate()
            (folder / name).mkdir(parents=True, exist_ok=True)
            store = LogStore(folder / name / "events.db")
            acceptor = Acceptor(store, own_peer_id=identity.peer_id)
            writer = EventWriter(identity, acceptor)
            closers += [store.close, writer.close]
            plane = DataPlane(
                identity, sign_many=writer.write_many, is_known_request=lambda request_id: True,
                acceptor=acceptor, flush_records=writer.flush,
            )  # fmt: skip
            planes.append(plane)
        caller, server = planes
        await caller.start()
        endpoint = await server.start()
        server.register_handler("expert", echo)
        hidden = torch.randn(1, hidden_size)  # [1, D]
        names = [f"expert[0][{expert}]" for expert in range(experts)]
        tensor_fields = {name: {"layer": 0, "expert": expert} for expert, name in enumerate(names)}

        async def call() -> object:
            return await caller.call(
                server.identity.peer_id, endpoint, "expert", request_id=_ROUND_TRIP_REQUEST, record=ExpertBatchSent,
                fields={"model_id": "round-trip", "step": 1}, tensors={name: hidden for name in names},
                tensor_fields=tensor_fields, timeout_s=timeout_s,
            )  # fmt: skip

        async with asyncio.timeout(timeout_s):
            return await measure_call_round_trip(call, payload_bytes=experts * hidden_size * 4, rounds=rounds, warmup=warmup)
    finally:
        for plane in planes:
            await plane.close()
        for close in reversed(closers):
            close()


def _sign_record(identity: Identity, record: type, index: int, data: memoryview, refs: tuple[str, ...]) -> Event:
    """Sign a one-tensor record that describes `data` as a float32 vector, numbered after `index`."""
    body = record(
        model_id="round-trip", step=index, layer=0, expert=0, name="hidden", dtype="float32",
        shape=(data.nbytes // 4,), digest=digest_of((data,)), nbytes=data.nbytes,
    )  # fmt: skip
    return sign_event(identity, body, seq=index + 1, lamport=index + 1, time_ms=wall_clock_ms(), refs=refs)


def _check_record(wire: bytes, author: str, chunks: list[zmq.Frame]) -> Event:
    """Decode and verify a received record by `author`, and check that `chunks` hash to its digest.

    Raises EventRejected for a malformed or badly signed record, and ValueError for another
    author or other bytes.
    """
    event = parse_event(wire)
    verify_event(event)
    digest = digest_of([chunk.buffer for chunk in chunks])
    if event.author != author or digest != event.body.digest:
        raise ValueError(
            f"round-trip record {event.id} does not match the exchange: signed by {event.author}, expected {author}; "
            f"the bytes hash to {digest}, the record says {event.body.digest}"
        )
    return event


async def _signed_echo(router: zmq.asyncio.Socket, identity: Identity, client: str) -> None:
    """Echo each payload back with a record of its own, as an expert node replies to a call."""
    while True:
        frames = await router.recv_multipart(copy=False)
        routing_id, header, wire, chunks = frames[0], frames[1], frames[2], frames[3:]
        received = _check_record(wire.bytes, client, chunks)
        payload = memoryview(b"".join(chunk.buffer for chunk in chunks))
        reply = _sign_record(identity, ExpertOutputProduced, received.body.step, payload, refs=(_ROUND_TRIP_REQUEST, received.id))
        await router.send_multipart([routing_id, header, reply.wire, *chunk_parts(payload)], copy=False)


async def _echo(router: zmq.asyncio.Socket) -> None:
    while True:
        frames = await router.recv_multipart(copy=False)
        await router.send_multipart(frames, copy=False)
