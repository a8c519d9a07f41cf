"""Round-trip measurements: the raw ZeroMQ floor, and any data-plane call, for the benches.

`measure_raw_round_trip` sends a payload from a DEALER to a ROUTER that echoes it, over the
same CurveZMQ sockets, ZAP handler and chunking the data plane uses, but with no events and
no checks. It is the floor a data-plane call is compared with. Both functions only measure
and return numbers; judging them is up to the caller.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from cortex.comm.frames import chunk_parts, encode_header
from cortex.comm.sockets import ZapHandler, cancel_and_wait, configure_client, configure_server
from events import Identity


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
        tasks = [loop.create_task(zap.run(), name="raw-zap"), loop.create_task(_echo(router), name="raw-echo")]
        payload = memoryview(bytearray(b"\x5a" * payload_bytes))
        samples: list[float] = []
        async with asyncio.timeout(timeout_s):
            for index in range(warmup + rounds):
                started = time.perf_counter_ns()
                await dealer.send_multipart([encode_header("call", index, kind="raw", chunks=[1]), *chunk_parts(payload)], copy=False)
                await dealer.recv_multipart(copy=False)
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


async def _echo(router: zmq.asyncio.Socket) -> None:
    while True:
        frames = await router.recv_multipart(copy=False)
        await router.send_multipart(frames, copy=False)
