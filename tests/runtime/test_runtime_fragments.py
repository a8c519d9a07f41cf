"""The fragment contract: shapes, the pause at MoE layers, sessions and the KV cache.

Shape legend: T = tokens, D = hidden size (64), V = vocabulary (512),
K = experts per token (4 for the DeepSeek-V3 test model), E = routed experts (16).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CheckpointFactory

from cortex.runtime.engine import LocalModel, dispatch_experts
from cortex.runtime.errors import SessionError
from cortex.runtime.fragments import Block, BlockOutput, Expert, Head, MoeCall
from cortex.runtime.loader import Loader

T, D, V, K, E = 7, 64, 512, 4, 16


def _tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deepseek(checkpoint: CheckpointFactory) -> Loader:
    return Loader(checkpoint("deepseek_v3"), device="cpu")


def test_fragment_shapes_follow_contract(deepseek: Loader) -> None:
    head, block = deepseek.load("head"), deepseek.load("block[0:3]")
    assert isinstance(head, Head) and isinstance(block, Block)
    hidden = head.embed(_tokens(T))
    assert hidden.shape == (T, D)

    step = block.forward_until_moe("s", hidden)
    assert isinstance(step, MoeCall)
    assert step.layer == 1  # layer 0 is dense (first_k_dense_replace = 1)
    assert step.hidden.shape == (T, D)
    assert step.routing.expert_ids.shape == (T, K)
    assert step.routing.expert_ids.dtype == torch.int64
    assert step.routing.weights.shape == (T, K)
    assert step.routing.weights.dtype == torch.float32

    expert = deepseek.load("expert[1][0]")
    assert isinstance(expert, Expert)
    assert expert.mlp.gate_up.shape == (2 * 32, D)
    assert expert.mlp.down.shape == (D, 32)
    assert expert(step.hidden[:3]).shape == (3, D)

    outputs = torch.zeros(T, K, D)
    step = block.combine_and_continue("s", outputs)
    assert isinstance(step, MoeCall) and step.layer == 2
    step = block.combine_and_continue("s", outputs)
    assert isinstance(step, BlockOutput)
    assert step.hidden.shape == (T, D)
    assert head.logits(step.hidden).shape == (T, V)
    assert block.session_length("s") == T


def test_routing_follows_deepseek_v3_rule(deepseek: Loader) -> None:
    block = deepseek.load("block[0:2]")
    assert isinstance(block, Block)
    step = block.forward_until_moe("s", torch.randn(T, D, generator=torch.Generator().manual_seed(1)))
    assert isinstance(step, MoeCall)
    ids, weights = step.routing.expert_ids, step.routing.weights
    groups = ids // (E // 4)  # 4 groups of 4 experts
    for row in range(T):
        assert len(set(ids[row].tolist())) == K
        assert len(set(groups[row].tolist())) <= 2  # topk_group = 2
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((T,), 2.5))  # normalized, times the scale


def test_routing_matches_transformers_router(checkpoint: CheckpointFactory, deepseek: Loader) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(checkpoint("deepseek_v3"))).eval()
    block = deepseek.load("block[0:2]")
    assert isinstance(block, Block)
    step = block.forward_until_moe("s", torch.randn(T, D, generator=torch.Generator().manual_seed(2)))
    assert isinstance(step, MoeCall)
    with torch.no_grad():
        _, ref_weights, ref_ids = reference.model.layers[1].mlp.gate(step.hidden)
    # Top-k is unsorted on both sides: compare each token's experts as sets, weights by expert.
    ours = step.routing.expert_ids.sort(dim=-1)
    theirs = ref_ids.sort(dim=-1)
    assert torch.equal(ours.values, theirs.values)
    torch.testing.assert_close(
        step.routing.weights.gather(1, ours.indices), ref_weights.gather(1, theirs.indices), rtol=1e-6, atol=1e-7
    )


def test_separately_loaded_fragments_match_local_model(checkpoint: CheckpointFactory) -> None:
    # As on separate nodes: each fragment comes from its own Loader, and experts are run one by one.
    folder = checkpoint("deepseek_v3")
    head = Loader(folder, device="cpu").load("head")
    blocks = [Loader(folder, device="cpu").load(spec) for spec in ("block[0:2]", "block[2:3]")]
    experts = {(layer, e): Loader(folder, device="cpu").load(f"expert[{layer}][{e}]") for layer in (1, 2) for e in range(E)}
    assert isinstance(head, Head)
    tokens = _tokens(T, seed=3)

    hidden = head.embed(tokens)
    for block in blocks:
        assert isinstance(block, Block)
        step = block.forward_until_moe("remote", hidden)
        while isinstance(step, MoeCall):
            outputs = torch.empty(T, K, D)
            for t in range(T):
                for k, e in enumerate(step.routing.expert_ids[t].tolist()):
                    expert = experts[(step.layer, e)]
                    assert isinstance(expert, Expert)
                    outputs[t, k] = expert(step.hidden[t : t + 1])[0]
            step = block.combine_and_continue("remote", outputs)
        hidden = step.hidden
    logits = head.logits(hidden)

    expected = LocalModel.load(folder, device="cpu").forward("local", tokens, all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_dispatch_groups_tokens_by_expert(deepseek: Loader) -> None:
    block = deepseek.load("block[0:2]")
    assert isinstance(block, Block)
    step = block.forward_until_moe("s", torch.randn(T, D, generator=torch.Generator().manual_seed(4)))
    assert isinstance(step, MoeCall)
    experts = {e: deepseek.load_expert(1, e) for e in range(E)}
    grouped = dispatch_experts(step, experts)
    assert grouped.shape == (T, K, D)
    for t in range(T):
        for k, e in enumerate(step.routing.expert_ids[t].tolist()):
            torch.testing.assert_close(grouped[t, k], experts[e](step.hidden[t : t + 1])[0], rtol=1e-5, atol=1e-6)


def test_chunked_prefill_matches_single_pass(checkpoint: CheckpointFactory) -> None:
    # 50 then 60 tokens: the second chunk needs a causal mask over the cache and grows the cache buffers.
    model = LocalModel.load(checkpoint("deepseek_v3"), device="cpu")
    tokens = _tokens(110, seed=5)
    whole = model.forward("whole", tokens, all_logits=True)
    model.forward("chunked", tokens[:50])
    second = model.forward("chunked", tokens[50:], all_logits=True)
    torch.testing.assert_close(second, whole[50:], rtol=1e-4, atol=1e-4)
    assert model.session_length("chunked") == 110


def test_session_continues_across_inference_mode(checkpoint: CheckpointFactory) -> None:
    model = LocalModel.load(checkpoint("deepseek_v3"), device="cpu")
    tokens = _tokens(12, seed=8)
    whole = model.forward("whole", tokens, all_logits=True)
    with torch.inference_mode():
        model.forward("mixed", tokens[:8])
    with torch.no_grad():
        rest = model.forward("mixed", tokens[8:], all_logits=True)  # appends to caches made in inference mode
    torch.testing.assert_close(rest, whole[8:], rtol=1e-4, atol=1e-4)


def test_sessions_keep_separate_caches(checkpoint: CheckpointFactory) -> None:
    model = LocalModel.load(checkpoint("qwen3_moe"), device="cpu")
    a, b = _tokens(5, seed=6), _tokens(9, seed=7)
    alone = model.forward("alone", b, all_logits=True)
    model.forward("a", a)
    interleaved = model.forward("b", b, all_logits=True)
    torch.testing.assert_close(interleaved, alone, rtol=1e-6, atol=1e-6)
    model.close_session("b")
    assert model.session_length("b") == 0
    assert model.session_length("a") == 5


def test_dense_block_returns_output_directly(checkpoint: CheckpointFactory) -> None:
    block = Loader(checkpoint("llama"), device="cpu").load("block[0:2]")
    assert isinstance(block, Block)
    assert block.moe_layers == []
    step = block.forward_until_moe("s", torch.randn(T, D))
    assert isinstance(step, BlockOutput)
    assert step.hidden.shape == (T, D)


def test_session_misuse_is_rejected(deepseek: Loader) -> None:
    block = deepseek.load("block[1:2]")
    assert isinstance(block, Block)
    with pytest.raises(ValueError, match=r"hidden states must be \[T, D\] with T >= 1, got shape \[0, 64\]"):
        block.forward_until_moe("x", torch.zeros(0, D))
    with pytest.raises(SessionError, match=r"session 'x' on block\[1:2\] is not waiting for expert outputs"):
        block.combine_and_continue("x", torch.zeros(T, K, D))
    step = block.forward_until_moe("x", torch.randn(T, D))
    assert isinstance(step, MoeCall)
    with pytest.raises(SessionError, match=r"waiting for the expert outputs of layer 1; call combine_and_continue"):
        block.forward_until_moe("x", torch.randn(1, D))
    with pytest.raises(ValueError, match=r"must be \[T, K, D\] = \[7, 4, 64\], got \[7, 3, 64\]"):
        block.combine_and_continue("x", torch.zeros(T, 3, D))
    assert isinstance(block.combine_and_continue("x", torch.zeros(T, K, D)), BlockOutput)
    with pytest.raises(SessionError, match=r"is at position 7, not 3"):
        block.forward_until_moe("x", torch.randn(1, D), position=3)
    assert isinstance(block.forward_until_moe("x", torch.randn(1, D), position=7), MoeCall)
