"""KV-cache estimates against the bytes a real transformers DynamicCache holds after a forward pass."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.scheduler.admission import ModelGeometry

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3_moe": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "q_lora_rank": None,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_kv_estimate_matches_dynamic_cache(model_type: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    config = AutoConfig.for_model(model_type, vocab_size=32, intermediate_size=32, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    cache = DynamicCache(config=config)
    tokens = 7

    with torch.no_grad():
        model(torch.arange(tokens)[None], cache=cache, use_cache=True)
    layers: list[Any] = list(cache.layers)
    measured = sum(tensor.numel() * tensor.element_size() for layer in layers for tensor in (layer.keys, layer.values))

    geometry = ModelGeometry.from_config(config.to_dict(), dtype="float32")
    assert geometry.kv_bytes(geometry.num_layers, tokens) == measured
