"""Test checkpoints from `cortex model make-test`, and model ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import CheckpointFactory
from safetensors import safe_open

from cortex.cli import main
from cortex.runtime.model_id import model_id
from cortex.runtime.testmodels import ROUTER_STD, make_test_checkpoint


def _tensor(folder: Path, name: str) -> Any:
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(folder / shard), "pt") as handle:
        return handle.get_tensor(name)


def test_deepseek_v3_checkpoint_is_meaningful(checkpoint: CheckpointFactory) -> None:
    folder = checkpoint("deepseek_v3")
    config = json.loads((folder / "config.json").read_text())
    assert config["n_routed_experts"] == 16
    assert config["n_group"] == 4  # 4 experts per group: top-2 sum differs from the group sum
    assert config["rope_parameters"]["rope_type"] == "yarn"
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 4
    spanning = [
        e for e in range(16)
        if len({weight_map[f"model.layers.1.mlp.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}) > 1
    ]
    assert spanning  # some expert's tensors lie in more than one shard
    router = _tensor(folder, "model.layers.1.mlp.gate.weight")
    assert abs(float(router.std()) - ROUTER_STD) < 0.1
    bias = _tensor(folder, "model.layers.1.mlp.gate.e_score_correction_bias")
    assert float(bias.abs().max()) > 0.05
    expert = _tensor(folder, "model.layers.1.mlp.experts.0.up_proj.weight")
    assert 0.07 < float(expert.std()) < 0.13


def test_tokenizer_loads_with_autotokenizer(checkpoint: CheckpointFactory) -> None:
    from transformers import AutoTokenizer

    folder = checkpoint("qwen2_moe")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    ids = tokenizer("Return a list of lines.")["input_ids"]
    assert ids[0] == config["bos_token_id"] == tokenizer.bos_token_id
    assert max(ids) < config["vocab_size"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Return a list of lines."


def test_same_seed_same_weights(tmp_path: Path, tokenizer: Any) -> None:
    first = make_test_checkpoint("olmoe", tmp_path / "a", seed=4, tokenizer=tokenizer)
    second = make_test_checkpoint("olmoe", tmp_path / "b", seed=4, tokenizer=tokenizer)
    other = make_test_checkpoint("olmoe", tmp_path / "c", seed=5, tokenizer=tokenizer)
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    assert _tensor(first, name).equal(_tensor(second, name))
    assert not _tensor(first, name).equal(_tensor(other, name))


def test_make_test_command_writes_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llama"
    assert main(["model", "make-test", "--arch", "llama", "--out", str(out), "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").exists()
    assert main(["model", "id", str(out)]) == 0
    assert capsys.readouterr().out.strip() == model_id(out)
    assert main(["model", "info", str(out)]) == 0
    assert "MoE layers:     none (dense model)" in capsys.readouterr().out


def test_model_id_depends_on_config_and_index(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    original = checkpoint("mixtral")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert model_id(copy) == model_id(original)
    assert len(model_id(original)) == 64

    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.1"  # informational, ignored
    (copy / "config.json").write_text(json.dumps(config))
    assert model_id(copy) == model_id(original)

    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert model_id(copy) != model_id(original)


def test_model_id_differs_between_layouts(checkpoint: CheckpointFactory) -> None:
    assert model_id(checkpoint("mixtral")) != model_id(checkpoint("mixtral", fused=True))
    assert model_id(checkpoint("mixtral")) != model_id(checkpoint("deepseek_v3"))
