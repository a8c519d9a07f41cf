"""The Loader reads only the tensors of the requested fragments, and its errors name the cause and the fix."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CheckpointFactory
from safetensors.torch import load_file, save_file

import cortex.runtime.checkpoint as checkpoint_module
from cortex.runtime import progress as progress_module
from cortex.runtime.checkpoint import Checkpoint
from cortex.runtime.engine import LocalModel
from cortex.runtime.errors import (
    CheckpointError,
    FragmentSpecError,
    MissingTensorError,
    ShapeMismatchError,
    UnsupportedModelError,
)
from cortex.runtime.fragments import Block, Expert, Head
from cortex.runtime.loader import Loader
from cortex.runtime.manifest import write_manifest
from cortex.runtime.routing import SigmoidGroupRouter

MIB = 1024 * 1024


class _RecordingSlice:
    def __init__(self, inner: Any, name: str, reads: list[tuple[str, int]]) -> None:
        self._inner, self._name, self._reads = inner, name, reads

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor: torch.Tensor = self._inner[index]
        self._reads.append((self._name, tensor.numel() * tensor.element_size()))
        return tensor

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._inner, attribute)


class _RecordingHandle:
    """A safe_open handle that records every tensor read and its size (headers are not reads)."""

    def __init__(self, inner: Any, reads: list[tuple[str, int]]) -> None:
        self._inner, self._reads = inner, reads

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self._inner.get_tensor(name)
        self._reads.append((name, tensor.numel() * tensor.element_size()))
        return tensor

    def get_slice(self, name: str) -> _RecordingSlice:
        return _RecordingSlice(self._inner.get_slice(name), name, self._reads)

    def keys(self) -> list[str]:
        return list(self._inner.keys())


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    recorded: list[tuple[str, int]] = []
    real_safe_open = checkpoint_module.safe_open
    monkeypatch.setattr(
        checkpoint_module, "safe_open", lambda *a, **k: _RecordingHandle(real_safe_open(*a, **k), recorded)
    )
    yield recorded


def _index(folder: Path) -> dict[str, str]:
    weight_map: dict[str, str] = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return weight_map


def test_expert_load_reads_only_its_tensors(checkpoint: CheckpointFactory, reads: list[tuple[str, int]]) -> None:
    folder = checkpoint("deepseek_v3")
    expert = Loader(folder, device="cpu").load("expert[1][3]")
    assert isinstance(expert, Expert)
    prefix = "model.layers.1.mlp.experts.3."
    expected = {prefix + p + ".weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert {name for name, _ in reads} == expected
    assert len(reads) == 3
    assert sum(size for _, size in reads) == 3 * 32 * 64 * 4
    assert len({_index(folder)[name] for name in expected}) >= 2  # the expert spans shard files


def test_head_and_block_read_only_their_tensors(checkpoint: CheckpointFactory, reads: list[tuple[str, int]]) -> None:
    loader = Loader(checkpoint("deepseek_v3"), device="cpu")
    assert isinstance(loader.load("head"), Head)
    assert {name for name, _ in reads} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    reads.clear()
    block = loader.load("block[1:2]")
    assert isinstance(block, Block)
    names = {name for name, _ in reads}
    assert all(name.startswith("model.layers.1.") for name in names)
    assert not any(".experts." in name for name in names)  # routed experts belong to expert fragments
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe"])
def test_fragment_plan_matches_reads(
    arch: str, checkpoint: CheckpointFactory, reads: list[tuple[str, int]]
) -> None:
    folder = checkpoint(arch)
    loader = Loader(folder, device="cpu")
    specs = ["head", f"block[0:{loader.num_layers}]"]
    specs += [f"expert[{layer}][{e}]" for layer in loader.moe_layers for e in range(loader.num_experts)]
    for spec in specs:
        reads.clear()
        before = loader.checkpoint.bytes_read
        loader.load(spec)
        assert sorted(loader.fragment_tensors(spec)) == sorted(name for name, _ in reads)
        assert loader.fragment_nbytes(spec) == loader.checkpoint.bytes_read - before
    # These fragments cover the whole checkpoint, each tensor once.
    checkpoint_bytes = sum(loader.checkpoint.info(name).nbytes for name in loader.checkpoint.weight_map)
    assert sum(loader.fragment_nbytes(spec) for spec in specs) == checkpoint_bytes


def test_fused_expert_reads_only_its_rows(checkpoint: CheckpointFactory, reads: list[tuple[str, int]]) -> None:
    folder = checkpoint("deepseek_v3", fused=True)
    loader = Loader(folder, device="cpu")
    expert = loader.load("expert[2][5]")
    assert isinstance(expert, Expert)
    assert sorted(reads) == [
        ("model.layers.2.mlp.experts.down_proj", 64 * 32 * 4),  # 1 of 16 experts' rows
        ("model.layers.2.mlp.experts.gate_up_proj", 64 * 64 * 4),
    ]
    full = Checkpoint(folder).tensor("model.layers.2.mlp.experts.gate_up_proj")  # [E, 2I, D]
    assert torch.equal(expert.mlp.gate_up, full[5])


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("VmRSS missing from /proc/self/status")


def _synthetic_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return folder


def test_lazy_read_keeps_resident_memory_small(tmp_path: Path) -> None:
    # 8 tensors of 16 MiB (128 MiB on disk) and one fused [8, 1024, 1024] float32 tensor (32 MiB).
    # safetensors 0.8 maps the file and reads a page when it is first touched. Each read tensor
    # is summed, so resident memory grows by the bytes actually read from the file.
    tensors = {f"expert.{i}.weight": torch.full((4 * MIB,), float(i)) for i in range(8)}
    tensors["fused"] = torch.arange(8, dtype=torch.float32).repeat_interleave(1024 * 1024).view(8, 1024, 1024)
    folder = _synthetic_checkpoint(tmp_path / "big", tensors)
    del tensors

    checkpoint = Checkpoint(folder)
    before = _rss_bytes()
    one = checkpoint.tensor("expert.5.weight")
    assert float(one.sum()) == 5.0 * 4 * MIB
    assert checkpoint.bytes_read == 16 * MIB
    assert _rss_bytes() - before < 24 * MIB  # one 16 MiB tensor, not the 160 MiB file

    before = _rss_bytes()
    row = checkpoint.rows("fused", 3)
    assert row.shape == (1024, 1024)
    assert float(row.sum()) == 3.0 * MIB
    assert checkpoint.bytes_read == 20 * MIB
    assert _rss_bytes() - before < 8 * MIB  # 4 MiB of rows, not the 32 MiB tensor

    # The measurement detects over-reads: touching every tensor grows resident memory by ~128 MiB.
    before = _rss_bytes()
    everything = [checkpoint.tensor(f"expert.{i}.weight") for i in range(8)]
    assert sum(float(t.sum()) for t in everything) == 28.0 * 4 * MIB
    assert _rss_bytes() - before > 96 * MIB


def test_bfloat16_load_keeps_deepseek_router_float32(checkpoint: CheckpointFactory) -> None:
    block = Loader(checkpoint("deepseek_v3"), device="cpu", dtype="bfloat16").load("block[1:2]")
    assert isinstance(block, Block)
    (layer,) = block.layers
    assert isinstance(layer.router, SigmoidGroupRouter)
    assert layer.router.weight.dtype == torch.float32
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    assert layer.shared_expert is not None
    assert layer.shared_expert.gate_up.dtype == torch.bfloat16


def test_bfloat16_checkpoint_loads_as_float32(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "llama", tmp_path)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({name: t.to(torch.bfloat16) for name, t in tensors.items()}, str(shard))
    write_manifest(Checkpoint(folder), terminal=False)  # the copied one lists float32 tensors
    head = Loader(folder, device="cpu", dtype="float32").load("head")
    assert isinstance(head, Head)
    assert head.embed_tokens.dtype == torch.float32
    original = Checkpoint(checkpoint("llama")).tensor("model.embed_tokens.weight")
    assert torch.equal(head.embed_tokens, original.to(torch.bfloat16).float())


def test_load_logs_fragment_memory(checkpoint: CheckpointFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cortex.runtime.loader"):
        Loader(checkpoint("deepseek_v3"), device="cpu").load("block[0:2]")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("loaded block[0:2] from deepseek_v3:") and "MiB on cpu as float32" in m for m in messages)


def test_slow_load_logs_progress_without_terminal(
    checkpoint: CheckpointFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module, "SHOW_AFTER_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cortex.runtime.progress"):
        Loader(checkpoint("deepseek_v3"), device="cpu", terminal=False).load("head")
    assert any(r.getMessage().startswith("loading head: ") for r in caplog.records)


def test_whole_model_load_reports_one_progress(
    checkpoint: CheckpointFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cortex.runtime.progress"):
        LocalModel.load(checkpoint("qwen3_moe"), device="cpu", terminal=False)
    messages = [r.getMessage() for r in caplog.records]
    assert messages
    assert all(m.startswith("loading qwen3_moe: ") for m in messages)
    assert messages[-1].endswith("(100%)")


def test_slow_load_shows_bar_on_terminal(checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "SHOW_AFTER_S", 0.0)
    started: list[int] = []
    real_start = progress_module.Progress.start

    def start(self: progress_module.Progress) -> None:
        started.append(1)
        real_start(self)

    monkeypatch.setattr(progress_module.Progress, "start", start)
    head = Loader(checkpoint("deepseek_v3"), device="cpu", terminal=True).load("head")
    assert isinstance(head, Head)
    assert started == [1]


# -- errors -------------------------------------------------------------------


def _copy(checkpoint: CheckpointFactory, arch: str, tmp_path: Path) -> Path:
    folder = tmp_path / arch
    shutil.copytree(checkpoint(arch), folder)
    return folder


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*nowhere not found; pass the folder"):
        Loader(tmp_path / "nowhere")


def test_missing_config_names_file(tmp_path: Path) -> None:
    folder = _synthetic_checkpoint(tmp_path / "noconfig", {"a": torch.zeros(2)})
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        Loader(folder)


def test_missing_weights_names_folder(tmp_path: Path) -> None:
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files in .*noweights"):
        Checkpoint(folder)


def test_missing_shard_names_file_and_tensor(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "deepseek_v3", tmp_path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = _index(folder)[name]
    (folder / shard).unlink()
    loader = Loader(folder, device="cpu")
    with pytest.raises(CheckpointError, match=rf"shard .*{shard} is missing .*re-download") as raised:
        loader.load("expert[1][3]")
    assert "model.layers." in str(raised.value)


def test_corrupt_shard_names_file(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "llama", tmp_path)
    shard = _index(folder)["model.norm.weight"]
    (folder / shard).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=rf"{shard} is not a readable safetensors file .*re-download it"):
        Loader(folder, device="cpu").load("head")


def test_missing_tensor_names_tensor(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "mixtral", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loader = Loader(folder, device="cpu")
    with pytest.raises(MissingTensorError, match=r"'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight' not found"):
        loader.load("expert[1][2]")
    assert isinstance(loader.load("expert[1][1]"), Expert)


def test_tensor_absent_from_its_shard(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "llama", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingTensorError, match=rf"mapped to .*{other} .*does not contain it"):
        Loader(folder, device="cpu").load("block[0:1]")


def test_shape_mismatch_names_tensor_and_shapes(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "deepseek_v3", tmp_path)
    _edit_config(folder, moe_intermediate_size=48)
    with pytest.raises(
        ShapeMismatchError, match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' .* shape \[32, 64\] .* implies \[48, 64\]"
    ):
        Loader(folder, device="cpu").load("expert[1][0]")


def test_unsupported_architecture_lists_supported(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint, "llama", tmp_path)
    _edit_config(folder, model_type="gpt_oss")
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt_oss' .* not supported") as raised:
        Loader(folder)
    for supported in ("deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama"):
        assert supported in str(raised.value)


def test_unsupported_dtype_names_tensor(tmp_path: Path) -> None:
    folder = _synthetic_checkpoint(tmp_path / "int8", {"w": torch.zeros(4, 4, dtype=torch.int8)})
    with pytest.raises(UnsupportedModelError, match=r"tensor 'w' in .* has dtype I8"):
        Checkpoint(folder).tensor("w")


def test_unsupported_quantization_names_method(tmp_path: Path) -> None:
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    folder = _synthetic_checkpoint(tmp_path / "gptq", {"w": torch.zeros(2)}, config)
    with pytest.raises(UnsupportedModelError, match=r"quantization method 'gptq' .* not supported; Cortex loads fp8"):
        Checkpoint(folder)


def test_fp8_without_scale_is_rejected(tmp_path: Path) -> None:
    config = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}
    folder = _synthetic_checkpoint(tmp_path / "noscale", {"w": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}, config)
    with pytest.raises(UnsupportedModelError, match=r"'w' .* float8_e4m3fn but has no 'w_scale_inv'"):
        Checkpoint(folder).tensor("w")


def test_fused_fp8_is_rejected(tmp_path: Path) -> None:
    folder = _synthetic_checkpoint(tmp_path / "fusedfp8", {"f": torch.zeros(2, 4, 4, dtype=torch.float8_e4m3fn)})
    with pytest.raises(UnsupportedModelError, match=r"fused tensor 'f' .* has dtype F8_E4M3; .* per-expert layout"):
        Checkpoint(folder).rows("f", 0)


def test_fragment_outside_model_is_rejected(checkpoint: CheckpointFactory) -> None:
    loader = Loader(checkpoint("deepseek_v3"), device="cpu")
    with pytest.raises(FragmentSpecError, match=r"block\[2:4\] ends after the last layer: the model has 3 layers"):
        loader.load("block[2:4]")
    with pytest.raises(FragmentSpecError, match=r"layer 0, which is a dense layer .* MoE layers of this model: \[1, 2\]"):
        loader.load("expert[0][1]")
    with pytest.raises(FragmentSpecError, match=r"expert 16, but each MoE layer has 16 experts"):
        loader.load("expert[1][16]")
