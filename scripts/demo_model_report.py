"""Measurements and the model card for the demo model trained by `train_demo_model.py`.

Expert load is counted in routed slots: each token fills `num_experts_per_tok`
slots in every MoE layer, so an expert's share is its slot count divided by
tokens * k, and perfect balance gives every expert 1 / n_routed_experts.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from train_demo_model import TrainingRecord
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerBase

# The card promises that on held-out text every expert's share of routed slots
# lies within these multiples of the balanced share 1 / n_routed_experts.
LOAD_BOUND_MIN_RATIO = 0.5
LOAD_BOUND_MAX_RATIO = 2.0
FIGURES_HEADING = "## Figures as JSON"


class RoutingCounter:
    """Forward hooks on every MoE router that count the tokens routed to each expert.

    `counts[layer]` is a float tensor [E] that accumulates over forward passes
    until `reset()`. DeepSeek-V3's router returns (logits, weights, indices), and
    the indices [T, k] are what the hooks count.
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers: dict[int, nn.Module] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        layers = cast(nn.ModuleList, model.get_submodule("model.layers"))
        for index, layer in enumerate(layers):
            router = getattr(layer.mlp, "gate", None)
            if router is None or not hasattr(router, "e_score_correction_bias"):
                continue
            self.routers[index] = router
            self.counts[index] = torch.zeros(router.e_score_correction_bias.numel())
            self._handles.append(router.register_forward_hook(self._hook(index)))

    def _hook(self, index: int) -> Callable[..., None]:
        def count(module: nn.Module, inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
            indices = output[2].reshape(-1)
            self.counts[index] += torch.bincount(indices, minlength=self.counts[index].numel()).float()

        return count

    def reset(self) -> None:
        for counts in self.counts.values():
            counts.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class ExpertLoad:
    """Share of routed slots per expert in each MoE layer, measured on `tokens` tokens."""

    tokens: int
    shares: dict[int, list[float]]  # layer index -> share per expert, summing to 1

    def summary(self) -> dict[str, dict[str, float]]:
        """Return min share, max share and coefficient of variation per layer."""
        result = {}
        for layer, shares in self.shares.items():
            mean = statistics.fmean(shares)
            result[str(layer)] = {
                "min_share": min(shares),
                "max_share": max(shares),
                "cv": statistics.pstdev(shares) / mean,
            }
        return result

    def within_bound(self) -> bool:
        """Return whether every expert's share lies within the bound the card states."""
        for shares in self.shares.values():
            balanced = 1.0 / len(shares)
            if min(shares) < LOAD_BOUND_MIN_RATIO * balanced or max(shares) > LOAD_BOUND_MAX_RATIO * balanced:
                return False
        return True


@torch.no_grad()
def evaluate_loss(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    """Return the mean next-token cross-entropy (nats) over windows [N, T]."""
    was_training = model.training
    model.eval()
    total = 0.0
    predicted = 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        loss = model(input_ids=chunk, labels=chunk).loss
        count = chunk.shape[0] * (chunk.shape[1] - 1)
        total += loss.item() * count
        predicted += count
    model.train(was_training)
    return total / predicted


@torch.no_grad()
def measure_expert_load(model: nn.Module, windows: torch.Tensor, batch: int) -> ExpertLoad:
    """Run windows [N, T] through the model and return each expert's share of routed slots."""
    counter = RoutingCounter(model)
    model.eval()
    try:
        for start in range(0, len(windows), batch):
            model(input_ids=windows[start : start + batch])
    finally:
        counter.remove()
    shares = {layer: (counts / counts.sum()).tolist() for layer, counts in counter.counts.items()}
    return ExpertLoad(tokens=windows.numel(), shares=shares)


@torch.no_grad()
def greedy_samples(
    model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> dict[str, str]:
    """Return prompt -> greedy continuation (text only, special tokens removed)."""
    model.eval()
    samples = {}
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        assert isinstance(text, str)
        samples[prompt] = text
    return samples


def _architecture_table(config: DeepseekV3Config, parameters: int, dtype: str) -> list[str]:
    rows = [
        ("architecture", "`DeepseekV3ForCausalLM` (transformers), `model_type` deepseek_v3"),
        ("parameters", f"{parameters:,} ({dtype} on disk)"),
        ("layers", f"{config.num_hidden_layers} (first {config.first_k_dense_replace} dense, the rest MoE)"),
        ("hidden size", str(config.hidden_size)),
        ("attention", f"MLA, {config.num_attention_heads} heads, q_lora_rank {config.q_lora_rank}, kv_lora_rank {config.kv_lora_rank}, qk_nope {config.qk_nope_head_dim} + qk_rope {config.qk_rope_head_dim}, v {config.v_head_dim}"),
        ("dense MLP width", str(config.intermediate_size)),
        ("routed experts", f"{config.n_routed_experts} per MoE layer in {config.n_group} groups, width {config.moe_intermediate_size}"),
        ("routing", f"sigmoid scores, top-{config.num_experts_per_tok} within the best {config.topk_group} groups, norm_topk_prob {config.norm_topk_prob}, routed_scaling_factor {config.routed_scaling_factor}"),
        ("shared experts", f"{config.n_shared_experts} of width {config.moe_intermediate_size * config.n_shared_experts}"),
        ("vocabulary", f"{config.vocab_size} (byte-level BPE)"),
        ("context", f"{config.max_position_embeddings} tokens"),
    ]
    return ["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]


def _load_table(load: ExpertLoad) -> list[str]:
    lines = ["| MoE layer | min share | max share | coefficient of variation |", "|---|---|---|---|"]
    for layer, figures in load.summary().items():
        lines.append(f"| {layer} | {figures['min_share']:.2%} | {figures['max_share']:.2%} | {figures['cv']:.3f} |")
    return lines


def write_model_card(
    out: Path,
    *,
    args: argparse.Namespace,
    config: DeepseekV3Config,
    parameters: int,
    corpus: dict[str, int],
    record: TrainingRecord,
    held_out_loss: float,
    load: ExpertLoad,
    samples: dict[str, str],
    machine: str,
    total_seconds: float,
) -> None:
    """Write MODEL_CARD.md with the recipe, the measured figures and a JSON block of them."""
    balanced = 1.0 / config.n_routed_experts
    figures = {
        "held_out_loss": round(held_out_loss, 4),
        "held_out_perplexity": round(math.exp(held_out_loss), 2),
        "held_out_tokens": corpus["held_out_tokens"],
        "steps": record.steps,
        "best_step": record.best_step,
        "train_tokens_seen": record.tokens,
        "train_seconds": round(record.train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "parameters": parameters,
        "dtype": args.dtype,
        "load_bound": {"min_share": LOAD_BOUND_MIN_RATIO * balanced, "max_share": LOAD_BOUND_MAX_RATIO * balanced},
        "load_within_bound": load.within_bound(),
        "expert_load": load.summary(),
        "samples": samples,
    }
    lines = [
        "# Cortex demo model",
        "",
        "A small DeepSeek-V3-architecture mixture-of-experts language model that writes",
        "English in the style of Python docstrings. It exists to demonstrate Cortex, with",
        "the head and blocks on one node and the routed experts on others. It knows little",
        "and repeats itself, so use it for nothing else.",
        "",
        "## Data",
        "",
        f"Docstrings of the Python {platform.python_version()} standard library, read with `ast` by",
        "`cortex.textdata.build_corpus` (tests, private modules and duplicates skipped):",
        f"{corpus['documents']:,} documents, {corpus['characters']:,} characters. A CRC-32 of each",
        f"document puts 5% of them in a held-out split: {corpus['train_documents']:,} train documents",
        f"({corpus['train_tokens']:,} tokens) and {corpus['held_out_documents']:,} held-out documents ({corpus['held_out_tokens']:,} tokens).",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE with {config.vocab_size} tokens, trained on the train split by",
        "`cortex.textdata.train_bpe_tokenizer`. Special tokens: `<|bos|>` (id "
        f"{config.bos_token_id}, prepended on encode), `<|eos|>` (id {config.eos_token_id}, ends every training document),",
        f"`<|pad|>` (id {config.pad_token_id}).",
        "",
        "## Architecture",
        "",
        *_architecture_table(config, parameters, args.dtype),
        "",
        "## Training",
        "",
        f"AdamW (peak learning rate {args.lr:g}, betas 0.9/0.95, weight decay 0.1, gradient clip 1.0),",
        f"{args.warmup_steps} warmup steps, then cosine decay to 10% over the time budget. Batches of",
        f"{args.batch} random windows of {args.context} tokens. {record.steps} steps ({record.tokens:,} tokens) in",
        f"{record.train_seconds / 60:.1f} minutes of training, {total_seconds / 60:.1f} minutes in all, stopped by the {record.stopped_by}.",
        f"The saved weights are from step {record.best_step}, the best held-out loss seen during training.",
        f"Machine: {machine}, shared with other jobs.",
        "",
        "Load balancing: after every step each MoE layer's `e_score_correction_bias`",
        f"moves by {args.bias_gamma:g} * sign(mean load - expert load), DeepSeek-V3's auxiliary-loss-free",
        "balancing. No auxiliary loss is used.",
        "",
        "Reproduce (the result varies with thread scheduling and with how many steps fit in the budget):",
        "",
        "```",
        _reproduce_command(args),
        "```",
        "",
        "## Results",
        "",
        f"Held-out loss: {held_out_loss:.3f} nats per token (perplexity {math.exp(held_out_loss):.1f}) on",
        f"{corpus['held_out_tokens']:,} held-out tokens.",
        "",
        f"Expert load on the held-out tokens, as each expert's share of routed slots (balanced: {balanced:.2%}).",
        f"Bound: every expert gets between {LOAD_BOUND_MIN_RATIO * balanced:.2%} and {LOAD_BOUND_MAX_RATIO * balanced:.2%}"
        f" ({'met' if load.within_bound() else 'NOT met'}).",
        "",
        *_load_table(load),
        "",
        "Greedy samples (40 new tokens, prompt in bold):",
        "",
        *[f"- **{prompt}**{_inline(text)}" for prompt, text in samples.items()],
        "",
        FIGURES_HEADING,
        "",
        "```json",
        json.dumps(figures, indent=2),
        "```",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


def _reproduce_command(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python scripts/train_demo_model.py --out {args.out} --max-minutes {args.max_minutes:g} "
        f"--seed {args.seed} --threads {args.threads} --vocab-size {args.vocab_size} --hidden {args.hidden} "
        f"--moe-intermediate {args.moe_intermediate} --batch {args.batch} --lr {args.lr:g} --bias-gamma {args.bias_gamma:g}"
    )


def _inline(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|")


def read_card_figures(card: Path) -> dict[str, Any]:
    """Return the JSON figures block of a model card written by `write_model_card`."""
    text = card.read_text(encoding="utf-8")
    block = text.split(FIGURES_HEADING, 1)[1].split("```json", 1)[1].split("```", 1)[0]
    figures: dict[str, Any] = json.loads(block)
    return figures
