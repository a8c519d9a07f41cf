"""Local generation: sampling, stop conditions, streamed text and the `cortex generate` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CheckpointFactory

from cortex.cli import main
from cortex.commands import generate as generate_command
from cortex.runtime import generation
from cortex.runtime.engine import LocalModel
from cortex.runtime.generation import SamplingSettings, generate_text, generate_tokens, sample_token


@pytest.fixture(scope="module")
def model(checkpoint: CheckpointFactory) -> LocalModel:
    return LocalModel.load(checkpoint("deepseek_v3"), device="cpu")


def test_greedy_picks_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_token(logits, SamplingSettings(), None) == 1


def test_top_p_keeps_only_the_nucleus() -> None:
    # Probabilities 0.5, 0.3, 0.2 (tokens 2, 0, 1): top_p 0.6 keeps tokens 2 and 0.
    logits = torch.log(torch.tensor([0.3, 0.2, 0.5]))
    generator = torch.Generator().manual_seed(0)
    settings = SamplingSettings(temperature=1.0, top_p=0.6)
    drawn = {sample_token(logits, settings, generator) for _ in range(200)}
    assert drawn == {0, 2}


def test_top_p_always_keeps_best_token() -> None:
    logits = torch.log(torch.tensor([0.9, 0.05, 0.05]))
    generator = torch.Generator().manual_seed(0)
    settings = SamplingSettings(temperature=1.0, top_p=0.01)
    assert {sample_token(logits, settings, generator) for _ in range(50)} == {0}


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        SamplingSettings(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        SamplingSettings(top_p=0.0)


def test_seed_repeats_sampling(model: LocalModel) -> None:
    settings = SamplingSettings(temperature=1.0, top_p=0.9, seed=11)
    first = list(generate_tokens(model, [0, 5, 9], 12, settings))
    second = list(generate_tokens(model, [0, 5, 9], 12, settings))
    other = list(generate_tokens(model, [0, 5, 9], 12, SamplingSettings(temperature=1.0, top_p=0.9, seed=12)))
    assert first == second
    assert first != other
    assert first != list(generate_tokens(model, [0, 5, 9], 12))  # differs from greedy


def test_generation_stops_at_eos_and_closes_session(model: LocalModel) -> None:
    greedy = list(generate_tokens(model, [0, 5, 9], 10))
    stopped = list(generate_tokens(model, [0, 5, 9], 10, eos_token_ids=[greedy[3]], session_id="eos"))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    assert model.session_length("eos") == 0


def test_generation_beyond_max_positions_is_rejected(model: LocalModel) -> None:
    with pytest.raises(ValueError, match=r"3 tokens plus 510 new tokens exceeds the model's max_position_embeddings of 512"):
        list(generate_tokens(model, [0, 5, 9], 510))


def test_stream_pieces_add_up_to_text(model: LocalModel, tokenizer: Any, checkpoint: CheckpointFactory) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint("deepseek_v3")))
    pieces: list[str] = []
    result = generate_text(model, hf_tokenizer, "The socket module", 24, on_text=pieces.append)
    assert result.stop_reason == "max_tokens"
    assert len(result.generated_ids) == 24
    assert "".join(pieces) == result.text == hf_tokenizer.decode(result.generated_ids, skip_special_tokens=True)
    assert result.prompt_ids[0] == hf_tokenizer.bos_token_id


def test_stream_holds_back_partial_characters(
    model: LocalModel, checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint("deepseek_v3")))
    # Byte-level BPE splits "ï", "é" and "☃" into several byte tokens each.
    scripted = hf_tokenizer("naïve café ☃", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(generation, "generate_tokens", lambda *args, **kwargs: (token for token in scripted))
    pieces: list[str] = []
    result = generate_text(model, hf_tokenizer, "x", len(scripted), on_text=pieces.append)
    assert result.text == "naïve café ☃"
    assert "".join(pieces) == result.text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_string_cuts_text(model: LocalModel, checkpoint: CheckpointFactory) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(checkpoint("deepseek_v3")))
    full = generate_text(model, hf_tokenizer, "The socket module", 24)
    stop = full.text[5:8]
    assert len(stop) == 3
    cut = full.text.index(stop)
    pieces: list[str] = []
    result = generate_text(model, hf_tokenizer, "The socket module", 24, stop=[stop], on_text=pieces.append)
    assert result.stop_reason == "stop"
    assert result.text == full.text[:cut]
    assert "".join(pieces) == result.text
    assert len(result.generated_ids) < 24


def test_cli_generate_json(checkpoint: CheckpointFactory, capsys: pytest.CaptureFixture[str]) -> None:
    folder = checkpoint("deepseek_v3")
    status = main(["generate", "--model", str(folder), "--max-tokens", "8", "--json", "def open(file)"])
    assert status == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "def open(file)"
    assert len(record["generated_token_ids"]) == 8
    assert record["prompt_token_ids"][0] == 0  # the tokenizer's BOS
    assert record["finish_reason"] == "length"
    assert len(record["model_id"]) == 64
    reference = LocalModel.load(folder, device="cpu")
    assert record["generated_token_ids"] == list(generate_tokens(reference, record["prompt_token_ids"], 8))


@pytest.mark.slow
def test_cli_generate_in_subprocess(checkpoint: CheckpointFactory) -> None:
    folder = checkpoint("qwen2_moe")
    command = [sys.executable, "-m", "cortex", "generate", "--model", str(folder), "--max-tokens", "5", "--json", "x"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert len(record["generated_token_ids"]) == 5
    reference = LocalModel.load(folder, device="cpu")
    assert record["generated_token_ids"] == list(generate_tokens(reference, record["prompt_token_ids"], 5))


def test_cli_generate_streams_text(checkpoint: CheckpointFactory, capsys: pytest.CaptureFixture[str]) -> None:
    folder = checkpoint("llama")
    assert main(["generate", "--model", str(folder), "--max-tokens", "6", "--temperature", "0.7", "--seed", "1", "x"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--model", str(folder), "--max-tokens", "6", "--temperature", "0.7", "--seed", "1", "--json", "x"]) == 0
    assert streamed == json.loads(capsys.readouterr().out)["text"] + "\n"


def test_cli_without_demo_model_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(generate_command, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    assert main(["generate", "hello"]) == 2
    error = capsys.readouterr().err
    assert "the demo model is not in this installation yet" in error
    assert "pass --model DIR" in error


def test_cli_rejects_bad_arguments(checkpoint: CheckpointFactory, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(checkpoint("llama"))
    assert main(["generate", "--model", folder, "--max-tokens", "0", "x"]) == 2
    assert "--max-tokens must be at least 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--model", folder, "--top-p", "1.5", "x"]) == 2
    assert "top_p must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["generate", "--model", folder, "--threads", "0", "x"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make_path", "expected"),
    [
        (lambda tmp: tmp / "missing", "not found"),
        (lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0], "is a file, not a folder"),
        (lambda tmp: (tmp / "empty", (tmp / "empty").mkdir())[0], "has no config.json"),
    ],
    ids=["missing", "file", "no-config"],
)
def test_cli_generate_bad_model_folder(
    tmp_path: Path, make_path: Any, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_path(tmp_path)
    assert main(["generate", "--model", str(folder), "hello"]) == 2
    error = capsys.readouterr().err
    assert expected in error
    assert str(folder) in error
