"""FP8 checkpoints: block-scaled float8_e4m3fn weights are dequantized at load.

The test quantizes a float32 test checkpoint itself, as DeepSeek-V3 is
published: every projection weight becomes float8_e4m3fn with a float32
`weight_scale_inv` per block, and `config.json` gets a `quantization_config`.
It dequantizes the same tensors with its own per-block loop into a float32
checkpoint, which transformers then runs as the reference.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CheckpointFactory
from runtime_reference import LOGITS_RTOL, compare_with_reference, reference_outputs
from safetensors.torch import load_file, save_file

from cortex.runtime.checkpoint import Checkpoint, dequantize_fp8_blockwise
from cortex.runtime.engine import LocalModel
from cortex.runtime.fragments import Expert
from cortex.runtime.loader import Loader
from cortex.runtime.manifest import MANIFEST_FILE, write_manifest

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = (24, 24)  # does not divide 64, so edge blocks are partial


def _quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scales[i, j] = scale
            quantized[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / scale).to(
                torch.float8_e4m3fn
            )
    return quantized, scales


def _dequantize_by_loop(quantized: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    result = torch.empty(quantized.shape)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            result[rows, cols] = quantized[rows, cols].float() * scales[i, j]
    return result


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    # DeepSeek-V3 quantizes the projections; embeddings, norms, router and LM head stay as they are.
    return tensor.dim() == 2 and (name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight"))


def _write_fp8_pair(source: Path, fp8_dir: Path, dequantized_dir: Path) -> None:
    for folder in (fp8_dir, dequantized_dir):
        shutil.copytree(
            source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", MANIFEST_FILE)
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    fp8: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if _is_quantized(name, tensor):
            quantized, scales = _quantize(tensor, BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = quantized, scales
            plain[name] = _dequantize_by_loop(quantized, scales, BLOCK)
        else:
            fp8[name] = plain[name] = tensor
    save_file(fp8, str(fp8_dir / "model.safetensors"))
    save_file(plain, str(dequantized_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))
    # New manifests, so every load below also verifies the stored FP8 bytes before dequantization.
    for folder in (fp8_dir, dequantized_dir):
        write_manifest(Checkpoint(folder), terminal=False)


@pytest.fixture(scope="module")
def fp8_pair(checkpoint: CheckpointFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    _write_fp8_pair(checkpoint("deepseek_v3"), root / "fp8", root / "dequantized")
    return root / "fp8", root / "dequantized"


def test_dequantize_matches_per_block_loop() -> None:
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    quantized, scales = _quantize(weight, (128, 128))
    assert scales.shape == (3, 2)
    expected = _dequantize_by_loop(quantized, scales, (128, 128))
    assert torch.equal(dequantize_fp8_blockwise(quantized, scales, (128, 128)), expected)
    assert (expected - weight).abs().max() < 0.07 * weight.abs().max()  # e4m3 keeps 3 mantissa bits


def test_fp8_checkpoint_weights_dequantize_exactly(fp8_pair: tuple[Path, Path]) -> None:
    fp8_dir, dequantized_dir = fp8_pair
    name = "model.layers.1.mlp.experts.7.down_proj.weight"
    checkpoint = Checkpoint(fp8_dir)
    assert checkpoint.info(name).dtype == "F8_E4M3"
    assert checkpoint.fp8_block == BLOCK
    loader = Loader(fp8_dir, device="cpu")
    expert = loader.load("expert[1][7]")
    assert isinstance(expert, Expert)
    assert loader.fragment_nbytes("expert[1][7]") == loader.checkpoint.bytes_read  # weights and their scales
    assert expert.mlp.down.dtype == torch.float32
    assert torch.equal(expert.mlp.down, Checkpoint(dequantized_dir).tensor(name))


@pytest.mark.slow
def test_fp8_model_matches_transformers_on_dequantized(fp8_pair: tuple[Path, Path]) -> None:
    fp8_dir, dequantized_dir = fp8_pair
    expected = reference_outputs(dequantized_dir)
    result = compare_with_reference(LocalModel.load(fp8_dir, device="cpu"), expected)
    assert result.relative_error <= LOGITS_RTOL
    assert result.greedy == result.reference_greedy
