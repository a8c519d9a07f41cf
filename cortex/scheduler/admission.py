"""Admission: KV-cache sizes from a model config, holders' KV budgets, and refusal events.

A block holder keeps a KV cache per session for its layers. Before a driver accepts a
request, it reserves on each holder of its route the bytes that the cache reaches at the
last position (prompt tokens plus max_tokens). When no holder has that room, the request
is rejected at admission instead of running a holder out of memory mid-generation.

KV bytes per token per layer, as transformers 5.25 caches them (DynamicCache):

    standard attention (Llama, Mixtral, Qwen, OLMoE)   2 * num_key_value_heads * head_dim
    MLA (DeepSeek-V2, DeepSeek-V3: kv_lora_rank set)   kv_lora_rank + qk_rope_head_dim

times the bytes of the dtype the holders run. The MLA cache holds the compressed latent and
the rotary key, not the expanded per-head keys and values. Sliding-window layers are
counted as full layers, so the estimate is an upper bound there.

Budget source: a node advertises its KV-cache budget for all the blocks it holds as
`PeerJoined.hardware["kv_cache_bytes"]` (an int, bytes). A holder that advertises none is
treated as having no limit. What is reserved on a holder is the sum over in-flight requests
in the Scheduler view (`SchedulerView.kv_reserved_by_holder`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cortex.registry import RegistryView
from cortex.scheduler.errors import ContextTooLong, PlanError
from cortex.scheduler.request_events import RequestFailed

KV_CACHE_HARDWARE_KEY = "kv_cache_bytes"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelGeometry:
    """The layer count, KV-cache bytes per token per layer and max positions of a model, from its config."""

    num_layers: int
    kv_bytes_per_token_layer: int
    max_positions: int | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.kv_bytes_per_token_layer < 0:
            raise ValueError(f"kv_bytes_per_token_layer must be >= 0, got {self.kv_bytes_per_token_layer}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: str | None = None) -> ModelGeometry:
        """Read a model's `config.json` (as a dict); `dtype` defaults to the config's, else float32.

        Raises ValueError naming the missing key or the unknown dtype.
        """
        dtype_name = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
        if dtype_name not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype_name!r} is not one of {sorted(DTYPE_BYTES)}; pass dtype= explicitly")
        num_layers = _required_int(config, "num_hidden_layers")
        if config.get("kv_lora_rank"):
            elements = _required_int(config, "kv_lora_rank") + _required_int(config, "qk_rope_head_dim")
        else:
            heads = _required_int(config, "num_attention_heads")
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or _required_int(config, "hidden_size") // heads)
            elements = 2 * kv_heads * head_dim
        max_positions = config.get("max_position_embeddings")
        return cls(num_layers, elements * DTYPE_BYTES[dtype_name], int(max_positions) if max_positions else None)

    def kv_bytes(self, layers: int, tokens: int) -> int:
        """Return the KV-cache bytes of `tokens` positions over `layers` decoder layers."""
        return layers * tokens * self.kv_bytes_per_token_layer

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextTooLong if the prompt plus max_tokens exceeds the model's positions."""
        if self.max_positions is not None and prompt_tokens + max_tokens > self.max_positions:
            raise ContextTooLong(
                f"a prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} needs "
                f"{prompt_tokens + max_tokens} positions, but the model has {self.max_positions}; "
                "shorten the prompt or lower max_tokens",
                {
                    "prompt_tokens": prompt_tokens,
                    "max_tokens": max_tokens,
                    "max_positions": self.max_positions,
                },
            )


def _required_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"model config has {key}={value!r}; planning needs it as an integer")
    return value


def kv_budget(registry: RegistryView, peer_id: str) -> float:
    """Return the peer's advertised KV-cache budget in bytes, or infinity if it advertised none."""
    record = registry.peers.get(peer_id)
    if record is None or record.announcement is None:
        return math.inf
    value = record.announcement.hardware.get(KV_CACHE_HARDWARE_KEY)
    # NOTE: a holder that advertises no budget is never refused; the node must set this key.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return math.inf
    return value


def request_failed_for(request_id: str, error: PlanError) -> RequestFailed:
    """Return the RequestFailed body a driver publishes when planning or admission raised `error`."""
    return RequestFailed(request_id, error.code, str(error), dict(error.details))
