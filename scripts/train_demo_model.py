"""Train Cortex's demo model: a small DeepSeek-V3-architecture MoE on stdlib docstrings.

The model uses transformers' own `DeepseekV3ForCausalLM`: MLA attention, a dense
first layer, then MoE layers with a sigmoid router, group-limited top-k, a shared
expert, `norm_topk_prob` and `routed_scaling_factor`. It trains on CPU within a
wall-clock budget (`--max-minutes`) and writes a folder that
`transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load.

transformers trains the router weights but leaves `e_score_correction_bias`
fixed, so routing can collapse onto a few experts. After every optimizer step
this script applies DeepSeek-V3's auxiliary-loss-free balancing: per MoE layer
it counts the tokens each expert received in the step (forward hooks on the
router modules) and moves that expert's bias by `gamma * sign(mean_load - load)`.

Usage:
    .venv/bin/python scripts/train_demo_model.py --out cortex/demo_model --max-minutes 18
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortex import textdata  # noqa: E402
from demo_model_report import ExpertLoad, measure_expert_load, write_model_card  # noqa: E402
from demo_model_report import RoutingCounter, evaluate_loss, greedy_samples  # noqa: E402

logger = logging.getLogger("train_demo_model")

SAMPLE_PROMPTS = ("Return the", "The default value is", "If the file", "This module provides", "Raise")
# Held-out windows scored at each evaluation during training. The final figures use all of them.
EVAL_WINDOWS_DURING_TRAINING = 32
# Seconds kept back from `--max-minutes` for the final evaluation and saving.
FINAL_RESERVE_SECONDS = 60.0


@dataclass
class TrainingRecord:
    """Step counts, timings and held-out losses of one training run, for the model card."""

    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_step: int = 0
    best_eval_loss: float = math.inf
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, eval loss)
    stopped_by: str = "time budget"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--max-minutes", type=float, default=18.0, help="wall-clock budget for the whole run, in minutes")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialization and batch order")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--corpus-chars", type=int, default=textdata.DEFAULT_MAX_CHARS, help="cap on corpus size, in characters")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included")
    parser.add_argument("--context", type=int, default=256, help="training window and max_position_embeddings, in tokens")
    parser.add_argument("--hidden", type=int, default=192, help="hidden size")
    parser.add_argument("--moe-intermediate", type=int, default=80, help="width of each routed and shared expert")
    parser.add_argument("--batch", type=int, default=16, help="windows per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps")
    parser.add_argument("--bias-gamma", type=float, default=0.01, help="correction-bias update speed per step")
    parser.add_argument("--eval-every", type=float, default=90.0, help="seconds between held-out evaluations")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace, ids: dict[str, int]) -> DeepseekV3Config:
    """Return the demo model's configuration: 4 layers, the first dense, 16 experts in 4 groups."""
    return DeepseekV3Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=512,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=args.context,
        rope_interleave=True,
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def token_windows(tokenizer: PreTrainedTokenizerBase, documents: list[str], context: int) -> torch.Tensor:
    """Encode documents as BOS text EOS, concatenate them and cut the stream into windows.

    Returns [N, context] token ids. The tail shorter than a window is dropped.
    """
    stream: list[int] = []
    # verbose=False: documents longer than the context are expected, since they are cut into windows.
    for encoding in tokenizer(documents, add_special_tokens=True, verbose=False)["input_ids"]:
        stream.extend(encoding)
        stream.append(tokenizer.eos_token_id)
    count = len(stream) // context
    if count == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one window of {context}; raise --corpus-chars")
    return torch.tensor(stream[: count * context], dtype=torch.long).view(count, context)


def update_correction_bias(model: DeepseekV3ForCausalLM, counter: RoutingCounter, gamma: float) -> None:
    """Move each router's correction bias toward equal load: bias += gamma * sign(mean - load)."""
    with torch.no_grad():
        for layer_index, router in counter.routers.items():
            load = counter.counts[layer_index]
            bias = router.get_buffer("e_score_correction_bias")
            bias += gamma * torch.sign(load.mean() - load)


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    """Return the learning rate: linear warmup, then cosine decay to 10% over the time budget."""
    warmup = min(1.0, (step + 1) / args.warmup_steps)
    cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warmup * cosine


def train(
    args: argparse.Namespace,
    model: DeepseekV3ForCausalLM,
    train_windows: torch.Tensor,
    eval_windows: torch.Tensor,
    deadline: float,
) -> tuple[dict[str, torch.Tensor], TrainingRecord]:
    """Train until `deadline` (a `time.monotonic()` value) or SIGINT/SIGTERM; return the best state."""
    record = TrainingRecord()
    stop_requested: list[str] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    counter = RoutingCounter(model)
    generator = torch.Generator().manual_seed(args.seed)
    best_state = copy.deepcopy(model.state_dict())
    start = time.monotonic()
    budget = deadline - start
    next_eval = start + args.eval_every
    recent_losses: list[float] = []
    while not stop_requested:
        now = time.monotonic()
        if now >= deadline:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, record.steps, (now - start) / budget)

        batch = train_windows[torch.randint(len(train_windows), (args.batch,), generator=generator)]
        counter.reset()
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_correction_bias(model, counter, args.bias_gamma)

        record.steps += 1
        record.tokens += batch.numel()
        recent_losses.append(loss.item())
        if time.monotonic() >= next_eval or time.monotonic() >= deadline:
            next_eval = time.monotonic() + args.eval_every
            eval_loss = evaluate_loss(model, eval_windows[:EVAL_WINDOWS_DURING_TRAINING], args.batch)
            train_loss = sum(recent_losses) / len(recent_losses)
            recent_losses.clear()
            record.evals.append((record.steps, train_loss, eval_loss))
            logger.info(
                "step %d: train loss %.3f, held-out loss %.3f, lr %.2e, %.0f s",
                record.steps, train_loss, eval_loss, optimizer.param_groups[0]["lr"], time.monotonic() - start,
            )
            if eval_loss < record.best_eval_loss:
                record.best_eval_loss = eval_loss
                record.best_step = record.steps
                best_state = copy.deepcopy(model.state_dict())
    if stop_requested:
        record.stopped_by = f"signal {stop_requested[0]}"
    counter.remove()
    record.train_seconds = time.monotonic() - start
    return best_state, record


def save_model(model: DeepseekV3ForCausalLM, out: Path, dtype: str) -> None:
    """Save weights (in `dtype`), config and generation config into `out`."""
    if dtype == "bfloat16":
        # Routers stay float32, as transformers keeps them when it loads DeepSeek-V3 in bfloat16.
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                continue
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out)


def describe_machine(threads: int) -> str:
    """Return the CPU model, core count, thread count and software versions in one line."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    reserve = min(FINAL_RESERVE_SECONDS, 0.25 * args.max_minutes * 60)
    deadline = started + args.max_minutes * 60 - reserve
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    documents = textdata.build_corpus(max_chars=args.corpus_chars)
    train_documents, held_out_documents = textdata.split_corpus(documents)
    tokenizer_model = textdata.train_bpe_tokenizer(train_documents, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    textdata.save_tokenizer(tokenizer_model, args.out, model_max_length=args.context)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out)
    train_windows = token_windows(tokenizer, train_documents, args.context)
    eval_windows = token_windows(tokenizer, held_out_documents, args.context)
    logger.info("%d train windows, %d held-out windows of %d tokens", len(train_windows), len(eval_windows), args.context)

    config = build_config(args, textdata.special_token_ids(tokenizer_model))
    model = DeepseekV3ForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("model has %d parameters", parameters)

    best_state, record = train(args, model, train_windows, eval_windows, deadline)
    model.load_state_dict(best_state)
    model.eval()

    final_loss = evaluate_loss(model, eval_windows, args.batch)
    load = measure_expert_load(model, eval_windows, args.batch)
    samples = greedy_samples(model, tokenizer, SAMPLE_PROMPTS, max_new_tokens=40)
    save_model(model, args.out, args.dtype)
    write_model_card(
        args.out,
        args=args,
        config=config,
        parameters=parameters,
        corpus={
            "documents": len(documents),
            "characters": sum(len(text) for text in documents),
            "train_documents": len(train_documents),
            "held_out_documents": len(held_out_documents),
            "train_tokens": train_windows.numel(),
            "held_out_tokens": eval_windows.numel(),
        },
        record=record,
        held_out_loss=final_loss,
        load=load,
        samples=samples,
        machine=describe_machine(args.threads),
        total_seconds=time.monotonic() - started,
    )
    logger.info("held-out loss %.3f (perplexity %.1f), load spread %s", final_loss, math.exp(final_loss), json.dumps(load.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
