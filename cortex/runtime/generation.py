"""Token generation on a `LocalModel`: sampling, stop conditions and streamed text.

Sampling: temperature 0 is greedy (argmax). Otherwise the logits are divided
by the temperature and softmaxed in float32. They are then cut to the smallest
set of tokens whose probability reaches `top_p`, and the most likely token
always stays. One token is drawn with a `torch.Generator` seeded from `seed`,
so a seed repeats a generation on the same machine and dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cortex.runtime.engine import LocalModel

_session_counter = itertools.count()


@dataclass(frozen=True)
class SamplingSettings:
    """Next-token sampling settings. Temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V]."""
    if settings.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)  # [V]
    if settings.top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= settings.top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def generate_tokens(
    model: LocalModel,
    prompt_ids: Sequence[int],
    max_tokens: int,
    settings: SamplingSettings = SamplingSettings(),
    eos_token_ids: Sequence[int] = (),
    session_id: str | None = None,
) -> Generator[int, None, None]:
    """Yield up to `max_tokens` new tokens after `prompt_ids`, stopping after an EOS token.

    The session's KV caches are dropped when the iterator finishes or is closed.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; a prompt needs at least one token (e.g. the BOS token)")
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and len(prompt_ids) + max_tokens > limit:
        raise ValueError(
            f"a prompt of {len(prompt_ids)} tokens plus {max_tokens} new tokens exceeds the model's "
            f"max_position_embeddings of {limit}; shorten the prompt or lower max_tokens"
        )
    session = session_id or f"local-{next(_session_counter)}"
    device = model.head.embed_tokens.device
    generator = None
    if settings.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    eos = set(eos_token_ids)
    try:
        with torch.inference_mode():
            logits = model.forward(session, torch.tensor(list(prompt_ids), device=device))[0]  # [V]
            for produced in range(max_tokens):
                token = sample_token(logits, settings, generator)
                yield token
                if token in eos or produced + 1 == max_tokens:
                    break
                logits = model.forward(session, torch.tensor([token], device=device))[0]
    finally:
        model.close_session(session)


@dataclass
class GenerationResult:
    """A finished generation: token ids, text and why it stopped (`eos`, `stop` or `max_tokens`)."""

    prompt: str
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "max_tokens"


def _eos_ids(tokenizer: Any, config: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)


def generate_text(
    model: LocalModel,
    tokenizer: Any,
    prompt: str,
    max_tokens: int,
    settings: SamplingSettings = SamplingSettings(),
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate text after `prompt`, calling `on_text` with each new piece as it is final.

    Text that could still become a stop string, or that ends in an incomplete
    UTF-8 sequence, is held back until the next token decides it. The returned
    text stops before the first stop string.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    result = GenerationResult(prompt=prompt, prompt_ids=prompt_ids)
    hold = max((len(s) for s in stop), default=1) - 1
    emitted = 0
    eos_ids = _eos_ids(tokenizer, model.config)
    tokens = generate_tokens(model, prompt_ids, max_tokens, settings, eos_ids)
    try:
        for token in tokens:
            if token in eos_ids:
                result.stop_reason = "eos"
                break
            result.generated_ids.append(token)
            text = tokenizer.decode(result.generated_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                result.text, result.stop_reason = text[:cut], "stop"
                break
            result.text = text
            safe = len(text) - hold
            while safe > emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            if on_text is not None and safe > emitted:
                on_text(text[emitted:safe])
                emitted = safe
    finally:
        tokens.close()  # drops the session's KV caches
    if on_text is not None and len(result.text) > emitted:
        on_text(result.text[emitted:])
    return result
