"""Tiny, seeded checkpoints of every supported architecture, for tests and benches.

`make_test_checkpoint(arch, out_dir, seed)` builds the model with transformers'
own classes, scales its weights so that bugs show, and writes it with
`save_pretrained` in small shards, so one expert's tensors land in more than one
file. A byte-level BPE tokenizer trained offline on standard-library docstrings
(`cortex.textdata`) is saved next to it, so `AutoTokenizer` loads the folder,
and a tensor manifest (`cortex-manifest.json`), so its model id covers the
weights and every load is verified.

Why the init differs from transformers' default (std 0.02): with it, MoE
outputs are about 0.01 and every routing mistake hides under the tolerance.
Here every weight has std 0.1 and router weights std 0.5, a real spread
between experts. DeepSeek-V3's correction bias is random, so dropping it
changes the selection. DeepSeek models use 16 experts in 4 groups, because
with 2 experts per group the sum of a group's top 2 equals the group's sum and
a wrong group score would go unseen. DeepSeek-V3 also uses YaRN rope scaling, whose
attention scale (mscale) a re-implementation must apply.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TEST_VOCAB_SIZE = 512
TEST_CORPUS_CHARS = 200_000
SHARD_SIZE = "48KB"

_DEEPSEEK_ATTENTION: dict[str, Any] = dict(
    num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16
)
_DEEPSEEK_MOE: dict[str, Any] = dict(
    num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
    n_routed_experts=16, num_experts_per_tok=4,
)

# arch name -> (model_type, config settings on top of _COMMON)
TEST_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "deepseek_v3": ("deepseek_v3", dict(
        **_DEEPSEEK_ATTENTION, **_DEEPSEEK_MOE, q_lora_rank=32, n_group=4, topk_group=2, n_shared_experts=1,
        norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        ),
    )),
    "deepseek_v2": ("deepseek_v2", dict(
        **_DEEPSEEK_ATTENTION, **_DEEPSEEK_MOE, q_lora_rank=32, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", n_shared_experts=2, routed_scaling_factor=4.0,
    )),
    # DeepSeek-V2-Lite's shape: no query compression, greedy top-k, 2 shared experts, scale 1.
    "deepseek_v2_lite": ("deepseek_v2", dict(
        **_DEEPSEEK_ATTENTION, **_DEEPSEEK_MOE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
        n_shared_experts=2, routed_scaling_factor=1.0,
    )),
    "mixtral": ("mixtral", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
    )),
    "qwen2_moe": ("qwen2_moe", dict(
        num_hidden_layers=3, num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=4, mlp_only_layers=[0],
        qkv_bias=True, norm_topk_prob=False,
    )),
    "qwen3_moe": ("qwen3_moe", dict(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    )),
    "olmoe": ("olmoe", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False,
    )),
    "llama": ("llama", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=128)),
}

_COMMON: dict[str, Any] = dict(
    hidden_size=64, num_attention_heads=4, max_position_embeddings=512, initializer_range=0.1,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
ROUTER_STD = 0.5
CORRECTION_BIAS_STD = 0.1


@functools.lru_cache(maxsize=1)
def test_tokenizer() -> Any:
    """Train (once per process) the byte-level BPE tokenizer that test checkpoints ship."""
    from cortex import textdata

    documents = textdata.build_corpus(max_chars=TEST_CORPUS_CHARS)
    return textdata.train_bpe_tokenizer(documents, vocab_size=TEST_VOCAB_SIZE)


def _config(arch: str, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    from cortex import textdata

    model_type, settings = TEST_ARCHITECTURES[arch]
    ids = textdata.special_token_ids(tokenizer)
    return AutoConfig.for_model(
        model_type,
        **_COMMON,
        **settings,
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def _scale_routers(model: torch.nn.Module) -> None:
    """Give routers a real spread and DeepSeek-V3's correction bias random values."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                parameter.normal_(0.0, ROUTER_STD)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, CORRECTION_BIAS_STD)


def make_test_checkpoint(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    fused: bool = False,
    tokenizer: Any = None,
    manifest: bool = True,
) -> Path:
    """Write a seeded tiny checkpoint of `arch` (a key of `TEST_ARCHITECTURES`) to `out_dir`.

    `fused=True` writes the fused expert layout (`experts.gate_up_proj` [E, 2I, D],
    `experts.down_proj` [E, D, I]) that transformers keeps in memory, instead of
    one tensor per expert and projection. `manifest=False` leaves out the tensor
    manifest, for tests of checkpoints published without one.
    """
    if arch not in TEST_ARCHITECTURES:
        raise ValueError(f"unknown test architecture {arch!r}; expected one of {', '.join(TEST_ARCHITECTURES)}")
    from transformers import AutoModelForCausalLM

    from cortex import textdata

    out = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else test_tokenizer()
    config = _config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _scale_routers(model)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE, save_original_format=not fused)
    textdata.save_tokenizer(tokenizer, out, model_max_length=int(config.max_position_embeddings))
    if manifest:
        from cortex.runtime.checkpoint import Checkpoint
        from cortex.runtime.manifest import write_manifest

        write_manifest(Checkpoint(out), terminal=False)
    logger.info("wrote %s test checkpoint (seed %d, %s layout) to %s", arch, seed, "fused" if fused else "per-expert", out)
    return out
