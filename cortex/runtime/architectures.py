"""The architectures Cortex runs, and where each keeps its tensors.

One `Architecture` per `model_type` in `config.json`. It names the transformers
classes that Cortex reuses (attention, rotary embedding, RMSNorm), the router
rule, which layers are MoE layers, and the checkpoint names of routed and shared
experts. Tensor names follow `save_pretrained` of transformers 5.25:

| model_type  | routed expert e of layer l (per-expert layout)                | router                   | shared expert                         |
|-------------|---------------------------------------------------------------|--------------------------|---------------------------------------|
| deepseek_v3 | model.layers.l.mlp.experts.e.{gate,up,down}_proj.weight       | mlp.gate.weight (+ bias) | mlp.shared_experts.* (no gate)        |
| deepseek_v2 | as deepseek_v3                                                | mlp.gate.weight          | mlp.shared_experts.* (no gate)        |
| mixtral     | model.layers.l.block_sparse_moe.experts.e.{w1,w3,w2}.weight   | block_sparse_moe.gate    | none                                  |
| qwen2_moe   | model.layers.l.mlp.experts.e.{gate,up,down}_proj.weight       | mlp.gate.weight          | mlp.shared_expert.* + shared_expert_gate (sigmoid) |
| qwen3_moe   | as qwen2_moe                                                  | mlp.gate.weight          | none                                  |
| olmoe       | as qwen2_moe                                                  | mlp.gate.weight          | none                                  |
| llama       | dense: model.layers.l.mlp.{gate,up,down}_proj.weight          | none                     | none                                  |

The fused layout that `save_pretrained(save_original_format=False)` writes keeps
all experts of a layer in `model.layers.l.mlp.experts.gate_up_proj` [E, 2I, D]
(gate rows first, then up rows) and `model.layers.l.mlp.experts.down_proj`
[E, D, I], with the router at `model.layers.l.mlp.gate.weight` for every
architecture above, Mixtral included.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cortex.runtime.errors import UnsupportedModelError


def _deepseek_is_moe(config: Any, layer: int) -> bool:
    return layer >= config.first_k_dense_replace and _deepseek_experts(config) > 0


def _qwen_is_moe(config: Any, layer: int) -> bool:
    return (
        layer not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (layer + 1) % config.decoder_sparse_step == 0
    )


def _always_moe(config: Any, layer: int) -> bool:
    return True


def _never_moe(config: Any, layer: int) -> bool:
    return False


def _deepseek_experts(config: Any) -> int:
    return int(config.n_routed_experts or 0)


def _deepseek_shared_size(config: Any) -> int:
    return int(config.moe_intermediate_size * (config.n_shared_experts or 0))


@dataclass(frozen=True)
class Architecture:
    """The facts Cortex needs about one `model_type`: classes, router rule and tensor names."""

    model_type: str
    class_prefix: str  # transformers class prefix, e.g. "DeepseekV3" for DeepseekV3Attention
    router: str  # router rule class in cortex.runtime.routing; "" for a dense model
    is_moe_layer: Callable[[Any, int], bool]
    num_experts: Callable[[Any], int]
    expert_intermediate_size: Callable[[Any], int]
    moe_prefix: str = "mlp"  # module of the MoE layer in the per-expert layout
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str = ""  # module name of the shared expert, "" if none
    shared_expert_gated: bool = False  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
    shared_intermediate_size: Callable[[Any], int] | None = None
    router_in_float32: bool = False  # DeepSeek keeps the router weight in float32 in any model dtype

    @property
    def modeling_module(self) -> str:
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"

    def transformers_class(self, suffix: str) -> Any:
        """Return the transformers class `<prefix><suffix>`, e.g. `DeepseekV3Attention`."""
        module = importlib.import_module(self.modeling_module)
        return getattr(module, f"{self.class_prefix}{suffix}")


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture(
            model_type="deepseek_v3",
            class_prefix="DeepseekV3",
            router="SigmoidGroupRouter",
            is_moe_layer=_deepseek_is_moe,
            num_experts=_deepseek_experts,
            expert_intermediate_size=lambda c: int(c.moe_intermediate_size),
            shared_expert="shared_experts",
            shared_intermediate_size=_deepseek_shared_size,
            router_in_float32=True,
        ),
        Architecture(
            model_type="deepseek_v2",
            class_prefix="DeepseekV2",
            router="SoftmaxGroupRouter",
            is_moe_layer=_deepseek_is_moe,
            num_experts=_deepseek_experts,
            expert_intermediate_size=lambda c: int(c.moe_intermediate_size),
            shared_expert="shared_experts",
            shared_intermediate_size=_deepseek_shared_size,
            router_in_float32=True,
        ),
        Architecture(
            model_type="mixtral",
            class_prefix="Mixtral",
            router="SoftmaxTopkRouter",
            is_moe_layer=_always_moe,
            num_experts=lambda c: int(c.num_local_experts),
            expert_intermediate_size=lambda c: int(c.intermediate_size),
            moe_prefix="block_sparse_moe",
            expert_projections=("w1", "w3", "w2"),
        ),
        Architecture(
            model_type="qwen2_moe",
            class_prefix="Qwen2Moe",
            router="SoftmaxTopkRouter",
            is_moe_layer=_qwen_is_moe,
            num_experts=lambda c: int(c.num_experts),
            expert_intermediate_size=lambda c: int(c.moe_intermediate_size),
            shared_expert="shared_expert",
            shared_expert_gated=True,
            shared_intermediate_size=lambda c: int(c.shared_expert_intermediate_size),
        ),
        Architecture(
            model_type="qwen3_moe",
            class_prefix="Qwen3Moe",
            router="SoftmaxTopkRouter",
            is_moe_layer=_qwen_is_moe,
            num_experts=lambda c: int(c.num_experts),
            expert_intermediate_size=lambda c: int(c.moe_intermediate_size),
        ),
        Architecture(
            model_type="olmoe",
            class_prefix="Olmoe",
            router="SoftmaxTopkRouter",
            is_moe_layer=_always_moe,
            num_experts=lambda c: int(c.num_experts),
            expert_intermediate_size=lambda c: int(c.intermediate_size),
        ),
        Architecture(
            model_type="llama",
            class_prefix="Llama",
            router="",
            is_moe_layer=_never_moe,
            num_experts=lambda c: 0,
            expert_intermediate_size=lambda c: 0,
        ),
    )
}


def architecture_for(model_type: str | None, source: str = "config.json") -> Architecture:
    """Return the `Architecture` of `model_type`, or raise naming the supported ones."""
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} in {source} is not supported; Cortex runs "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return arch
