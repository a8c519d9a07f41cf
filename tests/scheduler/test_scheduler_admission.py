"""Admission: KV-cache estimates from model configs, budgets, and refusals with their numbers."""

from __future__ import annotations

from typing import Any

import pytest
from scheduler_events_factory import DRIVER, SUBMITTER, acceptance, request_id_of, signed, submission
from scheduler_swarm import GEOMETRY, MODEL, NOW_MS, registry_of

from cortex.scheduler import ContextTooLong, KvBudgetExceeded, RequestFailed
from cortex.scheduler.admission import ModelGeometry, kv_budget, request_failed_for
from cortex.scheduler.planning import PlanningContext
from cortex.scheduler.routes import admit
from cortex.scheduler.view import SchedulerView, fold
from events import Identity, decode_event, sign_event

A, B, C = sorted((Identity.generate() for _ in range(3)), key=lambda identity: identity.peer_id)
REQUEST_ID = "7c" * 32

LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
DEEPSEEK_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "dtype": "bfloat16",
}


def context(
    holdings: dict[Identity, list[str]], budgets: dict[Identity, int], scheduler: SchedulerView | None = None
) -> PlanningContext:
    return PlanningContext(registry_of(holdings, budgets), scheduler or SchedulerView(), NOW_MS)


def test_geometry_standard_attention() -> None:
    geometry = ModelGeometry.from_config(LLAMA_CONFIG)

    assert geometry.num_layers == 2
    assert geometry.kv_bytes_per_token_layer == 2 * 2 * 16 * 4
    assert geometry.max_positions == 512
    assert ModelGeometry.from_config(LLAMA_CONFIG, dtype="float16").kv_bytes_per_token_layer == 2 * 2 * 16 * 2


def test_geometry_mla_latent() -> None:
    geometry = ModelGeometry.from_config(DEEPSEEK_CONFIG)

    assert geometry.kv_bytes_per_token_layer == (16 + 8) * 2
    assert geometry.max_positions is None


def test_geometry_errors_name_key() -> None:
    with pytest.raises(ValueError, match="num_hidden_layers=None"):
        ModelGeometry.from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ModelGeometry.from_config(LLAMA_CONFIG, dtype="int8")


def test_kv_budget_from_hardware() -> None:
    registry = registry_of({A: ["block[0:4]"], B: ["block[0:4]"]}, {A: 5_000})

    assert kv_budget(registry, A.peer_id) == 5_000
    assert kv_budget(registry, B.peer_id) == float("inf")
    assert kv_budget(registry, C.peer_id) == float("inf")


def test_admit_reserves_per_fragment() -> None:
    ctx = context({A: ["block[0:1]"], B: ["block[1:4]"]}, {A: 10_000, B: 10_000})

    plan = admit(ctx, MODEL, GEOMETRY, prompt_tokens=6, max_tokens=4)

    assert plan.route == {"block[0:1]": A.peer_id, "block[1:4]": B.peer_id}
    assert plan.kv_reservations == {"block[0:1]": 1 * 10 * 100, "block[1:4]": 3 * 10 * 100}
    assert plan.holders == [A.peer_id, B.peer_id]
    body = plan.accepted(REQUEST_ID)
    assert body.plan_digest == plan.digest
    assert body.kv_reservations == plan.kv_reservations


def test_admit_refuses_over_budget() -> None:
    ctx = context({A: ["block[0:4]"], B: ["block[0:4]"]}, {A: 3_000, B: 2_000})

    with pytest.raises(KvBudgetExceeded) as raised:
        admit(ctx, MODEL, GEOMETRY, prompt_tokens=6, max_tokens=4)

    message = str(raised.value)
    assert "block[0:4] needs 4,000 KV-cache bytes" in message
    assert "4 layers x 10 tokens x 100 bytes" in message
    assert f"{A.peer_id} has 3,000 of 3,000 free" in message
    assert f"{B.peer_id} has 2,000 of 2,000 free" in message
    assert "lower max_tokens" in message
    assert raised.value.details == {
        "model_id": MODEL,
        "fragment": "block[0:4]",
        "needed_bytes": 4_000,
        "free_bytes": 3_000,
        "budget_bytes": 3_000,
        "holder": A.peer_id,
    }


def test_admit_counts_in_flight_reservations() -> None:
    submit = signed(SUBMITTER, submission(), seq=1)
    busy = signed(DRIVER, acceptance(request_id_of(submit), {"block[0:4]": A.peer_id}, kv_bytes=7_000), seq=1, lamport=2)
    holdings = {A: ["block[0:4]"], B: ["block[0:4]"]}
    budgets = {A: 10_000, B: 3_500}

    plan = admit(context(holdings, budgets, fold([submit, busy])), MODEL, GEOMETRY, prompt_tokens=2, max_tokens=6)

    assert plan.route == {"block[0:4]": B.peer_id}
    with pytest.raises(KvBudgetExceeded, match=f"{A.peer_id} has 3,000 of 10,000 free"):
        admit(context(holdings, budgets, fold([submit, busy])), MODEL, GEOMETRY, prompt_tokens=6, max_tokens=4)


def test_admit_sums_fragments_on_one_holder() -> None:
    holdings = {A: ["block[0:2]", "block[2:4]"], B: ["block[2:4]"]}

    plan = admit(context(holdings, {A: 2_500, B: 2_500}), MODEL, GEOMETRY, prompt_tokens=6, max_tokens=4)

    assert plan.route == {"block[0:2]": A.peer_id, "block[2:4]": B.peer_id}


def test_admit_unlimited_holder_accepted() -> None:
    plan = admit(context({A: ["block[0:4]"]}, {}), MODEL, GEOMETRY, prompt_tokens=500, max_tokens=500)

    assert plan.kv_reservations == {"block[0:4]": 4 * 1_000 * 100}


def test_admit_refuses_too_long_context() -> None:
    with pytest.raises(ContextTooLong, match="needs 1001 positions, but the model has 1000"):
        admit(context({A: ["block[0:4]"]}, {}), MODEL, GEOMETRY, prompt_tokens=901, max_tokens=100)


def test_refusal_event_carries_reason() -> None:
    ctx = context({A: ["block[0:4]"]}, {A: 100})
    with pytest.raises(KvBudgetExceeded) as raised:
        admit(ctx, MODEL, GEOMETRY, prompt_tokens=1, max_tokens=1)

    body = request_failed_for(REQUEST_ID, raised.value)
    decoded = decode_event(sign_event(A, body, seq=1, lamport=1, time_ms=1).wire).body

    assert isinstance(decoded, RequestFailed)
    assert decoded.reason_code == "kv_budget_exceeded"
    assert decoded.message == str(raised.value)
    assert decoded.details["needed_bytes"] == 800
    assert decoded.details["budget_bytes"] == 100
