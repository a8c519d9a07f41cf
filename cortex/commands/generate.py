"""`cortex generate`: run a whole model in this process and stream its text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cortex.runtime.generation import GenerationResult

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
# Up to this hidden size a matrix-vector product is too small to split across
# threads: a second thread only adds synchronization, which on a busy machine
# slowed the demo model (hidden size 192) from 96 to 9 tokens/s.
SINGLE_THREAD_MAX_HIDDEN = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a model run in this process",
        description=(
            "Generate text after PROMPT with a checkpoint run fragment by fragment in this process "
            "(head, blocks, experts), streaming it to stdout. Temperature 0 is greedy decoding."
        ),
    )
    parser.add_argument("prompt", help="the text to continue")

    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"checkpoint folder with config.json, *.safetensors and tokenizer.json (default: {DEMO_MODEL_DIR})",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="maximum number of new tokens (default: 64)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 picks the most likely token (default: 0)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="sample only from the most likely tokens holding this much probability (default: 1.0)"
    )

    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, so a run can be repeated")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text; repeat for several"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with the prompt's and the generated token ids and text"
    )

    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads (default: 1 for models with hidden size up to {SINGLE_THREAD_MAX_HIDDEN}, else torch's default)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: float32)"
    )
    parser.set_defaults(func=run)


def _model_dir(model: Path | None) -> Path | None:
    folder = model if model is not None else DEMO_MODEL_DIR
    if (folder / "config.json").exists():
        return folder
    if model is None:
        print(
            f"error: the demo model is not in this installation yet ({DEMO_MODEL_DIR} has no config.json); "
            "pass --model DIR with a checkpoint folder, for example one written by "
            "`cortex model make-test --arch deepseek_v3 --out DIR`",
            file=sys.stderr,
        )
    elif not folder.exists():
        print(f"error: model folder {folder} not found; pass a Hugging Face checkpoint folder to --model", file=sys.stderr)
    elif not folder.is_dir():
        print(f"error: {folder} is a file, not a folder; pass a Hugging Face checkpoint folder to --model", file=sys.stderr)
    else:
        print(f"error: {folder} has no config.json; pass a Hugging Face checkpoint folder to --model", file=sys.stderr)
    return None


def swarm_prompt_problem(folder: Path, prompt: str, max_tokens: int, readers: int) -> str | None:
    """Return why a swarm of this model cannot take the prompt, or None when it fits.

    Checks what the swarm would reject only once it runs: the prompt sealed to `readers`
    peers must fit inline in the request event (`MAX_INLINE_PROMPT_CHARS`), and its tokens
    plus `max_tokens` must fit the model's positions. Call it before starting any process.
    """
    from cortex.privacy import seal
    from cortex.scheduler.admission import ModelGeometry
    from cortex.scheduler.content import MAX_INLINE_PROMPT_CHARS
    from cortex.scheduler.errors import ContextTooLong
    from events import Identity

    recipients = [Identity.generate().peer_id for _ in range(readers)]
    size = len(prompt.encode())
    if len(seal(prompt.encode(), recipients)) > MAX_INLINE_PROMPT_CHARS:
        low, high = 0, size  # the largest prompt in bytes whose sealed text fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if len(seal(b"a" * middle, recipients)) <= MAX_INLINE_PROMPT_CHARS else (low, middle - 1)
        return (
            f"the prompt has {size} bytes, but a request event carries at most {low} bytes of prompt "
            f"(sealed to {readers} peers in at most {MAX_INLINE_PROMPT_CHARS} characters); shorten --prompt"
        )
    import orjson
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    geometry = ModelGeometry.from_config(orjson.loads((folder / "config.json").read_bytes()), dtype="float32")
    try:
        geometry.check_context(len(tokenizer(prompt)["input_ids"]), max_tokens)
    except ContextTooLong as error:
        return f"{error} (--prompt, --max-tokens)"
    return None


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        print(f"error: --max-tokens must be at least 1, got {args.max_tokens}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    folder = _model_dir(args.model)
    if folder is None:
        return 2

    import torch
    from transformers import AutoTokenizer

    from cortex.runtime.engine import LocalModel
    from cortex.runtime.errors import ModelRuntimeError
    from cortex.runtime.generation import SamplingSettings, generate_text

    try:
        settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        print(f"error: no tokenizer could be loaded from {folder} ({error}); it needs tokenizer.json", file=sys.stderr)
        return 1
    try:
        model = LocalModel.load(folder, device=args.device, dtype=args.dtype)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        elif model.config.hidden_size <= SINGLE_THREAD_MAX_HIDDEN:
            torch.set_num_threads(1)
        on_text = None if args.json else _write
        result = generate_text(model, tokenizer, args.prompt, args.max_tokens, settings, args.stop, on_text)
    except ModelRuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(folder, result)
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# The names `RequestCompleted.finish_reason` uses, so generate, submit and demo print one field.
FINISH_REASONS = {"max_tokens": "length"}


def _print_json(folder: Path, result: GenerationResult) -> None:
    import orjson

    from cortex.runtime.model_id import model_id

    record = {
        "model": str(folder),
        "model_id": model_id(folder),
        "prompt": result.prompt,
        "prompt_token_ids": result.prompt_ids,
        "generated_token_ids": result.generated_ids,
        "text": result.text,
        "finish_reason": FINISH_REASONS.get(result.stop_reason, result.stop_reason),
    }
    sys.stdout.write(orjson.dumps(record).decode() + "\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
