"""Round-trip measurement helpers return numbers; nothing here asserts on time."""

from __future__ import annotations

import math

import pytest
import torch
from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node, ipv6_loopback_works

from cortex.comm import ExpertInputSent, measure_call_round_trip, measure_raw_round_trip


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
