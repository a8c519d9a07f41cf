"""Fragment-by-fragment execution matches the transformers model on the same checkpoint.

For every architecture: the prompt's logits agree within 1e-4 relative to the
largest logit in float32, and 32 greedy tokens are identical. The model runs
as separately loaded fragments (head, blocks, every expert), with routing,
dispatch and combination done by Cortex.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import CheckpointFactory
from runtime_reference import LOGITS_RTOL, Reference, compare_with_reference, reference_outputs, relative_error

from cortex.runtime.engine import LocalModel

ARCHITECTURES = [
    "deepseek_v3",
    "deepseek_v2",
    "deepseek_v2_lite",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "llama",
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fragments_match_transformers(
    arch: str, checkpoint: CheckpointFactory, reference: Callable[[str], Reference]
) -> None:
    # Blocks of 2 layers, so every multi-layer model also crosses a block boundary.
    model = LocalModel.load(checkpoint(arch), device="cpu", dtype="float32", block_size=2)
    result = compare_with_reference(model, reference(arch))
    assert result.relative_error <= LOGITS_RTOL
    assert result.greedy == result.reference_greedy


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral", "qwen2_moe"])
def test_fused_layout_matches_transformers(
    arch: str, checkpoint: CheckpointFactory, reference: Callable[[str], Reference]
) -> None:
    fused = checkpoint(arch, fused=True)
    index = json.loads((fused / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in index)
    assert not any(".experts.0." in name for name in index)
    model = LocalModel.load(fused, device="cpu", dtype="float32")
    result = compare_with_reference(model, reference(arch))
    assert result.relative_error <= LOGITS_RTOL
    assert result.greedy == result.reference_greedy


@pytest.mark.slow
def test_sliding_window_matches_transformers(
    checkpoint: CheckpointFactory, reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    # A window shorter than the prompt makes both prefill and decode use the sliding mask.
    folder = tmp_path / "mixtral-sliding"
    shutil.copytree(checkpoint("mixtral"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    expected = reference_outputs(folder)
    assert len(expected.prompt_ids) > 6
    assert relative_error(expected.logits, reference("mixtral").logits) > 1e-2  # the window changes the output
    model = LocalModel.load(folder, device="cpu")
    result = compare_with_reference(model, expected)
    assert result.relative_error <= LOGITS_RTOL
    assert result.greedy == result.reference_greedy


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral"])
def test_bfloat16_close_to_transformers_bfloat16(arch: str, checkpoint: CheckpointFactory) -> None:
    # Both sides round to bfloat16 in different places (fused gate/up, sum order): ~1e-2 apart.
    folder = checkpoint(arch)
    expected = reference_outputs(folder, dtype=torch.bfloat16)
    model = LocalModel.load(folder, device="cpu", dtype="bfloat16")
    assert model.head.embed_tokens.dtype == torch.bfloat16
    with torch.inference_mode():
        logits = model.forward("bf16", torch.tensor(expected.prompt_ids), all_logits=True)
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits, expected.logits) < 5e-2


def test_float16_runs_close_to_float32(checkpoint: CheckpointFactory, reference: Callable[[str], Reference]) -> None:
    expected = reference("llama")
    model = LocalModel.load(checkpoint("llama"), device="cpu", dtype="float16")
    with torch.inference_mode():
        logits = model.forward("fp16", torch.tensor(expected.prompt_ids), all_logits=True)
    assert logits.dtype == torch.float16
    assert relative_error(logits, expected.logits) < 1e-2


DEMO_MODEL_DIR = Path(__file__).resolve().parents[2] / "cortex" / "demo_model"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="the demo model is not built yet")
def test_demo_model_matches_transformers() -> None:
    result = compare_with_reference(LocalModel.load(DEMO_MODEL_DIR, device="cpu"), reference_outputs(DEMO_MODEL_DIR))
    assert result.relative_error <= LOGITS_RTOL
    assert result.greedy == result.reference_greedy
