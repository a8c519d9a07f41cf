"""Hypothesis-generated malformed messages against a live node: every one is rejected and counted."""

from __future__ import annotations

import math
from typing import Any

import torch
from comm_helpers import REQUEST_ID, Node, RawClient, build_call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.comm import DTYPES
from events import Identity

HIDDEN = torch.arange(15.0).reshape(3, 5)   # 60 bytes, sent as chunks of 24, 24 and 12
IDS = torch.arange(4, dtype=torch.int64)     # 32 bytes, one chunk
PART_COUNT = 7                               # header, record, 3 chunks, record, 1 chunk


def base_message(raw: RawClient, **overrides: Any) -> list[bytes]:
    return build_call(raw.signer, 1, {"hidden": HIDDEN, "ids": IDS}, chunk_bytes=24, **overrides)


part_index = st.integers(1, PART_COUNT - 1)

mutations = st.one_of(
    st.tuples(st.just("flip"), part_index, st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("drop"), part_index, st.integers(1, PART_COUNT)),
    st.tuples(st.just("extra"), st.lists(st.binary(max_size=64), min_size=1, max_size=3)),
    st.tuples(st.just("cut"), part_index, st.integers(1, 200)),
    st.tuples(st.just("header"), st.binary(max_size=200)),
    st.tuples(st.just("dtype"), st.text(min_size=1, max_size=16).filter(lambda name: name not in DTYPES)),
    st.tuples(
        st.just("shape"),
        st.lists(st.integers(0, 1000), max_size=8).map(tuple).filter(lambda shape: math.prod(shape) * 4 != 60),
    ),
    st.tuples(st.just("nbytes"), st.integers(0, 2**40).filter(lambda nbytes: nbytes != 60)),
    st.tuples(st.just("request"), st.binary(min_size=32, max_size=32).map(bytes.hex).filter(lambda ref: ref != REQUEST_ID)),
)


def mutate(raw: RawClient, mutation: tuple[Any, ...]) -> list[bytes]:
    kind = mutation[0]
    if kind in ("dtype", "shape", "nbytes"):
        return base_message(raw, **{kind: mutation[1]})
    if kind == "request":
        return base_message(raw, refs=(mutation[1],))
    parts = base_message(raw)
    if kind == "flip":
        _kind, index, position, mask = mutation
        data = bytearray(parts[index])
        data[position % len(data)] ^= mask
        parts[index] = bytes(data)
    elif kind == "drop":
        del parts[mutation[1] : mutation[1] + mutation[2]]
    elif kind == "extra":
        parts.extend(mutation[1])
    elif kind == "cut":
        parts[mutation[1]] = parts[mutation[1]][: -mutation[2]]
    elif kind == "header":
        parts[0] = mutation[1]
    return parts


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations)
async def test_generated_malformed_messages_are_rejected(server: Node, mutation: tuple[Any, ...]) -> None:
    raw = RawClient(Identity.generate(), server)
    try:
        rejected = server.dataplane.counters["rejected"]
        served = server.dataplane.counters["calls_served"]

        await raw.send(mutate(raw, mutation))
        # Replies come in order on one connection, so the bad message was handled before this one.
        header = await raw.good_call()

        assert header.op == "reply"
        assert server.dataplane.counters["rejected"] == rejected + 1
        assert server.dataplane.counters["calls_served"] == served + 1
        assert server.dataplane.counters["internal_errors"] == 0
    finally:
        raw.close()
