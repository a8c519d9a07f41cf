"""Router rules: which routed experts each token goes to, and with what weight.

Shape legend: T = tokens, D = hidden size, E = routed experts in the layer,
K = experts per token (`num_experts_per_tok`), G = expert groups (`n_group`).

Each rule follows the transformers 5.25 module of its architecture, operation
for operation, so that the same checkpoint gives the same experts and weights:

- `SigmoidGroupRouter` (DeepSeek-V3): sigmoid scores in float32. The
  `e_score_correction_bias` is added for selection only. A group's score is the
  sum of its two best biased scores, and the best `topk_group` groups stay. K
  experts are picked among them by biased score with an unsorted top-k. The
  weights are the unbiased scores, normalized to sum 1 if `norm_topk_prob`, then
  multiplied by `routed_scaling_factor`.
- `SoftmaxGroupRouter` (DeepSeek-V2, V2-Lite): softmax scores in float32, then
  `greedy` top-k or `group_limited_greedy` (a group's score is its best expert),
  times `routed_scaling_factor`, not normalized.
- `SoftmaxTopkRouter` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): softmax, top-k,
  renormalized always (Mixtral) or only if `norm_topk_prob` (the Qwen models and
  OLMoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingDecision:
    """The experts picked for each token and the weights of their outputs.

    `expert_ids` is [T, K] int64; `weights` is [T, K], float32 for DeepSeek and
    Mixtral, the model dtype for the Qwen models and OLMoE (as in transformers).
    Row t lists token t's experts in no particular order.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor


class SigmoidGroupRouter:
    """DeepSeek-V3 routing: sigmoid scores, bias for selection, group-limited top-k."""

    def __init__(self, weight: torch.Tensor, correction_bias: torch.Tensor, config: Any) -> None:
        self.weight = weight  # [E, D], float32
        self.e_score_correction_bias = correction_bias  # [E], float32
        self.top_k = int(config.num_experts_per_tok)
        self.n_group = int(config.n_group)
        self.topk_group = int(config.topk_group)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.routed_scaling_factor = float(config.routed_scaling_factor)

    def __call__(self, hidden: torch.Tensor) -> RoutingDecision:
        tokens, experts = hidden.shape[0], self.weight.shape[0]
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias  # [T, E], for selection only

        grouped = biased.view(tokens, self.n_group, experts // self.n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, experts // self.n_group).reshape(tokens, experts)
        biased = biased.masked_fill(~expert_mask.bool(), float("-inf"))

        expert_ids = torch.topk(biased, k=self.top_k, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, expert_ids)  # [T, K], unbiased
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return RoutingDecision(expert_ids, weights * self.routed_scaling_factor)


class SoftmaxGroupRouter:
    """DeepSeek-V2 routing: softmax scores, greedy or group-limited greedy top-k.

    NOTE: like transformers 5.25, this ignores `norm_topk_prob`; every published
    DeepSeek-V2 and V2-Lite checkpoint sets it to false.
    """

    def __init__(self, weight: torch.Tensor, config: Any) -> None:
        self.weight = weight  # [E, D], float32
        self.top_k = int(config.num_experts_per_tok)
        self.topk_method = str(config.topk_method)
        self.n_group = int(config.n_group or 1)
        self.topk_group = int(config.topk_group or 1)
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {self.topk_method!r} is not supported; expected greedy or group_limited_greedy")

    def __call__(self, hidden: torch.Tensor) -> RoutingDecision:
        tokens, experts = hidden.shape[0], self.weight.shape[0]
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.topk_method == "group_limited_greedy":
            group_scores = scores.view(tokens, self.n_group, experts // self.n_group).max(dim=-1).values  # [T, G]
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, experts // self.n_group).reshape(tokens, experts)
            scores = scores.masked_fill(~expert_mask.bool(), 0.0)
        weights, expert_ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [T, K]
        return RoutingDecision(expert_ids, weights * self.routed_scaling_factor)


class SoftmaxTopkRouter:
    """Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE routing: softmax, top-k, optional renormalization."""

    def __init__(self, weight: torch.Tensor, config: Any, always_normalize: bool, weights_in_model_dtype: bool) -> None:
        self.weight = weight  # [E, D], model dtype
        self.top_k = int(config.num_experts_per_tok)
        self.normalize = always_normalize or bool(getattr(config, "norm_topk_prob", False))
        self.weights_in_model_dtype = weights_in_model_dtype

    def __call__(self, hidden: torch.Tensor) -> RoutingDecision:
        logits = F.linear(hidden, self.weight)  # [T, E], model dtype
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        return RoutingDecision(expert_ids, weights)


Router = SigmoidGroupRouter | SoftmaxGroupRouter | SoftmaxTopkRouter


def build_router(
    rule: str, model_type: str, config: Any, weight: torch.Tensor, correction_bias: torch.Tensor | None
) -> Router:
    """Build the router named by an `Architecture.router` from its loaded tensors."""
    if rule == "SigmoidGroupRouter":
        if correction_bias is None:
            raise ValueError("SigmoidGroupRouter needs e_score_correction_bias")
        return SigmoidGroupRouter(weight, correction_bias, config)
    if rule == "SoftmaxGroupRouter":
        return SoftmaxGroupRouter(weight, config)
    if rule == "SoftmaxTopkRouter":
        mixtral = model_type == "mixtral"
        return SoftmaxTopkRouter(weight, config, always_normalize=mixtral, weights_in_model_dtype=not mixtral)
    raise ValueError(f"unknown router rule {rule!r}")
