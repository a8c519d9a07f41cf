"""Reference outputs from transformers and the comparison that runtime tests assert on.

The reference is the transformers model class of the checkpoint, loaded with
`from_pretrained` in float32: full-prompt logits and 32 greedy tokens (with
`eos_token_id=None`, so it never stops early). Cortex passes when its logits are
within `LOGITS_RTOL` of the reference, relative to the largest reference logit,
and its 32 greedy tokens are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cortex.runtime.engine import LocalModel
from cortex.runtime.generation import generate_tokens

LOGITS_RTOL = 1e-4
GREEDY_TOKENS = 32
PROMPT = "Return the number of items in the container, or raise TypeError if it has no length."


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    logits: torch.Tensor  # [T, V]
    greedy: list[int]


@dataclass(frozen=True)
class Comparison:
    relative_error: float
    greedy: list[int]
    reference_greedy: list[int]

    @property
    def tokens_equal(self) -> bool:
        return self.greedy == self.reference_greedy

    @property
    def matches(self) -> bool:
        return self.relative_error <= LOGITS_RTOL and self.tokens_equal


def prompt_ids(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return list(tokenizer(PROMPT)["input_ids"])


def reference_outputs(checkpoint: Path, dtype: torch.dtype = torch.float32) -> Reference:
    from transformers import AutoModelForCausalLM

    ids = prompt_ids(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
        # An explicit all-ones mask: generate would otherwise infer padding from pad_token_id.
        generated = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=None,
        )
    return Reference(ids, logits, generated[0, len(ids) :].tolist())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def compare_with_reference(model: LocalModel, reference: Reference) -> Comparison:
    """Run the prompt and 32 greedy tokens through `model`'s fragments and compare."""
    with torch.inference_mode():
        logits = model.forward("compare", torch.tensor(reference.prompt_ids), all_logits=True)
    model.close_session("compare")
    greedy = list(generate_tokens(model, reference.prompt_ids, GREEDY_TOKENS))
    return Comparison(relative_error(logits, reference.logits), greedy, reference.greedy)
