"""Round-trip measurement helpers return numbers; nothing here asserts on time."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch
import zmq
from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node, ipv6_loopback_works

from cortex.comm import (
    ExpertInputSent,
    measure_call_round_trip,
    measure_local_call_round_trip,
    measure_raw_round_trip,
    measure_signed_round_trip,
)
from events import Identity, LogStore


async def test_raw_round_trip_returns_samples() -> None:
    stats = await measure_raw_round_trip(payload_bytes=4096, rounds=20, warmup=2)

    assert stats.rounds == 20
    assert stats.payload_bytes == 4096
    assert 0 < stats.min_us <= stats.median_us <= stats.p90_us <= max(stats.samples_us)
    assert math.isfinite(stats.mean_us)


@pytest.mark.skipif(not ipv6_loopback_works(), reason="IPv6 loopback (::1) is not available on this machine")
async def test_raw_round_trip_over_ipv6_with_chunks() -> None:
    stats = await measure_raw_round_trip(payload_bytes=5 * 1024 * 1024, rounds=2, warmup=0, host="[::1]")

    assert stats.rounds == 2
    assert stats.min_us > 0


async def test_call_to_raw_ratio_is_a_number(client: Node, server: Node) -> None:
    hidden = torch.randn(16, 256)

    async def one_call() -> object:
        return await client.dataplane.call(
            server.peer_id, server.dataplane.endpoint, "expert", request_id=REQUEST_ID, record=ExpertInputSent,
            fields=EXPERT_FIELDS, tensors={"hidden": hidden}, timeout_s=10.0,
        )

    call = await measure_call_round_trip(one_call, payload_bytes=hidden.numel() * 4, rounds=10, warmup=2)
    raw = await measure_raw_round_trip(payload_bytes=hidden.numel() * 4, rounds=10, warmup=2)
    ratio = call.median_us / raw.median_us

    assert call.rounds == 10
    assert math.isfinite(ratio) and ratio > 0
    assert server.dataplane.counters["calls_served"] == 12


async def test_round_trip_rejects_zero_rounds() -> None:
    with pytest.raises(ValueError, match="rounds"):
        await measure_raw_round_trip(rounds=0)


async def test_signed_round_trip_returns_samples() -> None:
    stats = await measure_signed_round_trip(payload_bytes=768, rounds=20, warmup=2)

    assert stats.rounds == 20
    assert stats.payload_bytes == 768
    assert 0 < stats.min_us <= stats.median_us


async def test_signed_round_trip_rejects_partial_float() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        await measure_signed_round_trip(payload_bytes=766)


def test_signed_round_trip_check_rejects_wrong_bytes() -> None:
    from cortex.comm.roundtrip import _ROUND_TRIP_REQUEST, _check_record, _sign_record

    identity = Identity.generate()
    sent = memoryview(b"\x01" * 16)
    record = _sign_record(identity, ExpertInputSent, 0, sent, refs=(_ROUND_TRIP_REQUEST,))
    assert _check_record(record.wire, identity.peer_id, [zmq.Frame(bytes(sent))]).id == record.id

    with pytest.raises(ValueError, match="does not match"):
        _check_record(record.wire, identity.peer_id, [zmq.Frame(b"\x02" * 16)])
    with pytest.raises(ValueError, match="does not match"):
        _check_record(record.wire, Identity.generate().peer_id, [zmq.Frame(bytes(sent))])


async def test_local_call_round_trip_logs_every_record(tmp_path: Path) -> None:
    stats = await measure_local_call_round_trip(tmp_path, hidden_size=64, experts=2, rounds=10, warmup=2)

    assert stats.rounds == 10
    assert stats.payload_bytes == 2 * 64 * 4
    # Each call is one signed ExpertBatchSent and one ExpertBatchProduced, stored in both logs.
    for side in ("caller", "server"):
        store = LogStore(tmp_path / side / "events.db")
        types = collections.Counter(event.type for event in store.events())
        store.close()
        assert types["ExpertBatchSent"] == 12, side
        assert types["ExpertBatchProduced"] == 12, side
