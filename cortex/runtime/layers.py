"""Building blocks of the fragments: gated MLPs, decoder layers and the KV cache.

Shape legend: T = tokens in this call, S = tokens in the session so far
(cached plus new), D = hidden size, I = intermediate size of an MLP,
H = attention heads, Dh = per-head size of a cached tensor.

Attention, rotary embeddings and RMSNorm are the transformers 5.25 modules of
each architecture: MLA for DeepSeek, grouped-query attention with q/k norms for
Qwen3-MoE and OLMoE, and YaRN scaling where the config requests it. They are
built on the meta device and filled with the checkpoint's tensors. MLPs are Cortex's own,
because transformers 5.x fuses all experts of a layer into one tensor while a
Cortex node holds any subset of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cortex.runtime.architectures import Architecture
from cortex.runtime.routing import Router

Activation = Callable[[torch.Tensor], torch.Tensor]


def activation(name: str) -> Activation:
    """Return the activation function `hidden_act` names, as transformers defines it."""
    if name in ("silu", "swish"):
        return F.silu
    from transformers.activations import ACT2FN

    function: Activation = ACT2FN[name]
    return function


class GatedMLP:
    """`down(act(gate(x)) * up(x))`, with gate and up stacked in one matrix.

    `gate_up` is [2I, D] (gate rows first, the layout transformers 5.x uses for
    fused experts) and `down` is [D, I]. Calling it maps [T, D] to [T, D].
    """

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        act: Activation,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> None:
        self.gate_up = gate_up
        self.down = down
        self.act = act
        self.gate_up_bias = gate_up_bias
        self.down_bias = down_bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up, self.gate_up_bias).chunk(2, dim=-1)  # [T, I] each
        return F.linear(self.act(gate) * up, self.down, self.down_bias)  # [T, D]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if t is not None]


class KVCache:
    """The attention cache of one session for the layers of one block.

    Transformers attention modules call `update(new_keys, new_values, layer_idx)`
    and attend over what it returns: [1, H, S, Dh] views into buffers that grow by
    doubling, so a decode step appends in place instead of copying the whole cache.
    MLA layers cache their compressed latents the same way.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lengths: dict[int, int] = {}

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = keys.shape[-2]
        length = self._lengths.get(layer_idx, 0)
        buffers = self._buffers.get(layer_idx)
        if buffers is None or length + new > buffers[0].shape[-2]:
            buffers = self._grow(buffers, keys, values, length, length + new)
            self._buffers[layer_idx] = buffers
        key_buffer, value_buffer = buffers
        key_buffer[..., length : length + new, :] = keys
        value_buffer[..., length : length + new, :] = values
        self._lengths[layer_idx] = length + new
        return key_buffer[..., : length + new, :], value_buffer[..., : length + new, :]

    @staticmethod
    def _grow(
        old: tuple[torch.Tensor, torch.Tensor] | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        length: int,
        needed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = max(64, 2 * needed)
        # Normal tensors even under torch.inference_mode, so a session can continue outside it.
        with torch.inference_mode(False):
            key_buffer = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
            value_buffer = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        if old is not None:
            key_buffer[..., :length, :] = old[0][..., :length, :]
            value_buffer[..., :length, :] = old[1][..., :length, :]
        return key_buffer, value_buffer

    def length(self, layer_idx: int) -> int:
        return self._lengths.get(layer_idx, 0)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._buffers.values())


def attention_mask(past: int, new: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Return the boolean mask [1, 1, T, S] for `new` tokens after `past` cached ones.

    Returns None where plain causal attention needs no mask: a single new token
    without a sliding window, or a first call (scaled_dot_product_attention then
    applies its own causal mask).
    """
    total = past + new
    if window is None or total <= window:
        if new == 1 or past == 0:
            return None
    query = torch.arange(past, total, device=device)[:, None]  # [T, 1]
    key = torch.arange(total, device=device)[None, :]  # [1, S]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    return allowed.view(1, 1, new, total)


class DecoderLayer:
    """One decoder layer: attention, then a dense MLP or the non-expert part of an MoE.

    An MoE layer keeps its router and shared expert. Its routed experts live in
    `Expert` fragments that the caller runs.
    """

    def __init__(
        self,
        index: int,
        input_layernorm: nn.Module,
        self_attn: nn.Module,
        post_attention_layernorm: nn.Module,
        mlp: GatedMLP | None = None,
        router: Router | None = None,
        shared_expert: GatedMLP | None = None,
        shared_expert_gate: torch.Tensor | None = None,
        window: int | None = None,
    ) -> None:
        self.index = index
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.router = router
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate  # [1, D], Qwen2-MoE only
        self.window = window

    @property
    def is_moe(self) -> bool:
        return self.router is not None

    def attend(self, hidden: torch.Tensor, position_embeddings: Any, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run attention with its residual: [1, T, D] -> [1, T, D]."""
        attended, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden),
            position_embeddings=position_embeddings,
            attention_mask=mask,
            cache=cache,
        )
        return hidden + attended

    def dense_mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the dense MLP with its residual: [1, T, D] -> [1, T, D]."""
        assert self.mlp is not None
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def shared_output(self, normed: torch.Tensor) -> torch.Tensor | None:
        """Return the shared expert's output for the MoE inputs [T, D], gated if the model gates it."""
        if self.shared_expert is None:
            return None
        shared = self.shared_expert(normed)  # [T, D]
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(F.linear(normed, self.shared_expert_gate)) * shared  # gate: [T, 1]
        return shared

    def modules(self) -> list[nn.Module]:
        return [self.input_layernorm, self.self_attn, self.post_attention_layernorm]

    def tensors(self) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []
        for module in self.modules():
            found.extend(module.parameters())
        for mlp in (self.mlp, self.shared_expert):
            if mlp is not None:
                found.extend(mlp.tensors())
        if self.router is not None:
            found.append(self.router.weight)
            bias = getattr(self.router, "e_score_correction_bias", None)
            if bias is not None:
                found.append(bias)
        if self.shared_expert_gate is not None:
            found.append(self.shared_expert_gate)
        return found


def build_module(arch: Architecture, suffix: str, *args: Any) -> nn.Module:
    """Instantiate a transformers module of `arch` on the meta device (no memory, no init)."""
    cls = arch.transformers_class(suffix)
    with torch.device("meta"):
        module: nn.Module = cls(*args)
    return module


def fill_module(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Assign checkpoint tensors to a meta module's parameters and freeze it."""
    module.load_state_dict(tensors, strict=True, assign=True)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()
