"""`cortex bench local`: Cortex's local runtime against transformers' generate.

Both generate the same number of greedy tokens after the same prompt, from the
same checkpoint, in this process, with the same torch thread count, float32 on
the CPU. transformers runs `generate` with its default KV cache, as users run
it; Cortex runs the model fragment by fragment (`LocalModel`), with routed
experts called one by one. Runs alternate between the two, and every run's
tokens must be identical or the bench fails. Throughput is new tokens divided
by the wall time of the whole call (prefill included); the median run counts.

Models: the DeepSeek-V3 test checkpoint (`cortex model make-test --arch
deepseek_v3`, written to a temporary folder) and the demo model when
`cortex/demo_model/` contains one, or the folders passed with `--model`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
PROMPT = "Return a new list containing all items from the iterable in ascending order."
GOAL_TARGET = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "local",
        help="tokens/s of Cortex's local runtime against transformers generate",
        description=(
            "Generate the same greedy tokens with Cortex's fragment runtime and with transformers' generate "
            "(KV cache on) on the same checkpoint, side by side in one process, and report tokens/s of each. "
            "Fails if the generated tokens differ."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=None,
        help="checkpoint folder to bench; repeat for several (default: the DeepSeek-V3 test model and the demo model)",
    )
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per run (default: 128, 32 with --quick)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs of each side (default: 5, 3 with --quick)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (default: 1; models this small gain nothing from more threads)",
    )
    parser.set_defaults(func=run)


def _time_pair(reference: Any, model: Any, prompt_ids: list[int], tokens: int) -> tuple[float, float, list[int]]:
    import torch

    from cortex.runtime.generation import generate_tokens

    inputs = torch.tensor([prompt_ids])
    started = time.perf_counter()
    with torch.inference_mode():
        generated = reference.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,
        )
    reference_s = time.perf_counter() - started
    expected = generated[0, len(prompt_ids) :].tolist()

    started = time.perf_counter()
    produced = list(generate_tokens(model, prompt_ids, tokens))
    cortex_s = time.perf_counter() - started
    if produced != expected:
        first = next(i for i, (a, b) in enumerate(zip(produced, expected, strict=False)) if a != b)
        raise RuntimeError(
            f"Cortex and transformers generated different tokens (first difference at new token {first}: "
            f"{produced[first]} vs {expected[first]}); the runtime is wrong, so the timing means nothing"
        )
    return reference_s, cortex_s, produced


def bench_model(folder: Path, name: str, tokens: int, runs: int, report: BenchReport) -> None:
    """Time both runtimes on one checkpoint and add its figures and goal to `report`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cortex.runtime.engine import LocalModel

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    prompt_ids = list(tokenizer(PROMPT)["input_ids"])
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model = LocalModel.load(folder, device="cpu", dtype="float32")

    _time_pair(reference, model, prompt_ids, min(tokens, 8))  # warm-up
    reference_times, cortex_times = [], []
    for _ in range(runs):
        reference_s, cortex_s, _ = _time_pair(reference, model, prompt_ids, tokens)
        reference_times.append(reference_s)
        cortex_times.append(cortex_s)

    reference_rate = tokens / statistics.median(reference_times)
    cortex_rate = tokens / statistics.median(cortex_times)
    report.results[f"{name}_prompt_tokens"] = len(prompt_ids)
    report.results[f"{name}_transformers_tokens_per_s"] = reference_rate
    report.results[f"{name}_cortex_tokens_per_s"] = cortex_rate
    report.results[f"{name}_tokens_identical"] = True
    report.goals.append(
        Goal(f"{name}: cortex / transformers tokens/s", cortex_rate / reference_rate, GOAL_TARGET)
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from cortex.runtime.testmodels import make_test_checkpoint

    tokens = args.tokens or (32 if args.quick else 128)
    runs = args.runs or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    report = BenchReport(bench="local")
    report.results.update(
        {"torch_threads": args.threads, "new_tokens_per_run": tokens, "timed_runs": runs, "dtype": "float32", "device": "cpu"}
    )
    with tempfile.TemporaryDirectory(prefix="cortex-bench-local-") as scratch:
        models: list[tuple[str, Path]] = []
        if args.model:
            models = [(folder.name.replace("-", "_"), folder) for folder in args.model]
        else:
            models.append(("deepseek_v3_test", make_test_checkpoint("deepseek_v3", Path(scratch) / "deepseek_v3")))
            if (DEMO_MODEL_DIR / "config.json").exists():
                models.append(("demo", DEMO_MODEL_DIR))
            else:
                print(
                    f"goal for the demo model not measured: {DEMO_MODEL_DIR} holds no model yet (no config.json)",
                    file=sys.stderr,
                )
        try:
            for name, folder in models:
                bench_model(folder, name, tokens, runs, report)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return emit(report, args.json)
