"""Planted bugs make the reference comparison fail, so its passing means something.

Each case loads a model and plants one bug in its fragments, by changing a
loaded tensor or field or by monkeypatching a router. It then runs the same
comparison that `test_runtime_reference.py` asserts on, and requires it to fail
on both counts: the greedy tokens must differ, and the logits must be off by
more than `MIN_ERROR` relative. That is 1000 times the tolerance, and the
planted bugs measured 0.2 to 0.9.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import CheckpointFactory
from runtime_reference import Reference, compare_with_reference

from cortex.runtime.engine import LocalModel
from cortex.runtime.layers import DecoderLayer
from cortex.runtime.routing import RoutingDecision, SigmoidGroupRouter, SoftmaxGroupRouter, SoftmaxTopkRouter

MIN_ERROR = 0.1

Mutation = Callable[[LocalModel, pytest.MonkeyPatch], None]


def _moe_layers(model: LocalModel) -> list[DecoderLayer]:
    return [layer for block in model.blocks for layer in block.layers if layer.is_moe]


def drop_correction_bias(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bias enters only selection, so zeroing it removes it from selection alone.
    for layer in _moe_layers(model):
        assert isinstance(layer.router, SigmoidGroupRouter)
        layer.router.e_score_correction_bias = torch.zeros_like(layer.router.e_score_correction_bias)


def biased_scores_as_weights(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    original = SigmoidGroupRouter.__call__

    def route(self: SigmoidGroupRouter, hidden: torch.Tensor) -> RoutingDecision:
        decision = original(self, hidden)
        scores = F.linear(hidden.float(), self.weight.float()).sigmoid()
        weights = (scores + self.e_score_correction_bias).gather(1, decision.expert_ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return RoutingDecision(decision.expert_ids, weights * self.routed_scaling_factor)

    monkeypatch.setattr(SigmoidGroupRouter, "__call__", route)


def skip_group_limit(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        assert isinstance(layer.router, SigmoidGroupRouter | SoftmaxGroupRouter)
        layer.router.topk_group = layer.router.n_group


def group_max_score(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # A group scored by its best expert instead of the sum of its best two.
    def route(self: SigmoidGroupRouter, hidden: torch.Tensor) -> RoutingDecision:
        scores = F.linear(hidden.float(), self.weight.float()).sigmoid()
        biased = scores + self.e_score_correction_bias
        tokens, experts = biased.shape
        group_scores = biased.view(tokens, self.n_group, -1).max(dim=-1).values
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1)
        mask = keep.unsqueeze(-1).expand(-1, -1, experts // self.n_group).reshape(tokens, experts)
        expert_ids = biased.masked_fill(~mask.bool(), float("-inf")).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, expert_ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return RoutingDecision(expert_ids, weights * self.routed_scaling_factor)

    monkeypatch.setattr(SigmoidGroupRouter, "__call__", route)


def skip_normalization(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        assert isinstance(layer.router, SigmoidGroupRouter)
        layer.router.norm_topk_prob = False


def skip_routed_scaling(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        assert isinstance(layer.router, SigmoidGroupRouter)
        layer.router.routed_scaling_factor = 1.0


def skip_shared_expert(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        assert layer.shared_expert is not None
        layer.shared_expert = None


def skip_shared_expert_gate(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        assert layer.shared_expert_gate is not None
        layer.shared_expert_gate = None


def skip_renormalization(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        assert isinstance(layer.router, SoftmaxTopkRouter)
        assert layer.router.normalize
        layer.router.normalize = False


def swap_gate_and_up(model: LocalModel, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in _moe_layers(model):
        for expert in model.experts_of(layer.index).values():
            gate, up = expert.mlp.gate_up.chunk(2, dim=0)
            expert.mlp.gate_up = torch.cat([up, gate], dim=0)


CASES: list[tuple[str, Mutation]] = [
    ("deepseek_v3", drop_correction_bias),
    ("deepseek_v3", biased_scores_as_weights),
    ("deepseek_v3", skip_group_limit),
    ("deepseek_v3", group_max_score),
    ("deepseek_v3", skip_normalization),
    ("deepseek_v3", skip_routed_scaling),
    ("deepseek_v3", skip_shared_expert),
    ("deepseek_v3", swap_gate_and_up),
    ("deepseek_v2", skip_group_limit),
    ("deepseek_v2_lite", skip_shared_expert),
    ("qwen2_moe", skip_shared_expert),
    ("qwen2_moe", skip_shared_expert_gate),
    ("qwen3_moe", skip_renormalization),
    ("mixtral", skip_renormalization),
    ("mixtral", swap_gate_and_up),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "mutation"), CASES, ids=[f"{a}-{m.__name__}" for a, m in CASES])
def test_planted_bug_fails_comparison(
    arch: str,
    mutation: Mutation,
    checkpoint: CheckpointFactory,
    reference: Callable[[str], Reference],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = LocalModel.load(checkpoint(arch), device="cpu")
    mutation(model, monkeypatch)
    result = compare_with_reference(model, reference(arch))
    assert not result.matches
    assert result.relative_error > MIN_ERROR
    assert not result.tokens_equal
