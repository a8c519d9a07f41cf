"""Tensor manifests: model ids that cover the weights, verified loads, and `cortex model manifest`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CheckpointFactory
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import cortex
import cortex.runtime.checkpoint as checkpoint_module
import cortex.runtime.manifest as manifest_module
from cortex.cli import main
from cortex.runtime import progress as progress_module
from cortex.runtime.checkpoint import Checkpoint
from cortex.runtime.errors import DigestMismatchError, ManifestError
from cortex.runtime.fragments import Expert
from cortex.runtime.loader import Loader
from cortex.runtime.manifest import (
    MANIFEST_FILE,
    Manifest,
    TensorEntry,
    compare_manifests,
    compute_manifest,
    read_manifest,
    write_manifest,
)
from cortex.runtime.model_id import covers_weights, model_id
from cortex.runtime.testmodels import make_test_checkpoint

DEMO_MODEL_DIR = Path(cortex.__file__).parent / "demo_model"
TAMPERED = "model.layers.1.mlp.experts.3.up_proj.weight"
TAMPERED_PATTERN = r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"


def _copy(folder: Path, target: Path, manifest: bool = True) -> Path:
    ignore = None if manifest else shutil.ignore_patterns(MANIFEST_FILE)
    shutil.copytree(folder, target, ignore=ignore)
    return target


def _shard_of(folder: Path, name: str) -> Path:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / weight_map[name]


def _data_range(shard: Path, name: str) -> tuple[int, int]:
    """Return the absolute byte range of tensor `name` in a safetensors file."""
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def _flip_byte(shard: Path, offset: int) -> None:
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))


def _edit_manifest(folder: Path, edit: Any) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    edit(data["tensors"])
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


class _RecordingHandle:
    """A safe_open handle that records the tensor names read, whole or as slices."""

    def __init__(self, inner: Any, reads: list[str]) -> None:
        self._inner, self._reads = inner, reads

    def get_tensor(self, name: str) -> torch.Tensor:
        self._reads.append(name)
        tensor: torch.Tensor = self._inner.get_tensor(name)
        return tensor

    def get_slice(self, name: str) -> Any:
        self._reads.append(name)
        return self._inner.get_slice(name)

    def keys(self) -> list[str]:
        return list(self._inner.keys())


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    recorded: list[str] = []
    real_safe_open = checkpoint_module.safe_open
    monkeypatch.setattr(
        checkpoint_module, "safe_open", lambda *a, **k: _RecordingHandle(real_safe_open(*a, **k), recorded)
    )
    yield recorded


# -- model ids -----------------------------------------------------------------


def test_same_weights_same_id(checkpoint: CheckpointFactory, tmp_path: Path, tokenizer: Any) -> None:
    original = checkpoint("mixtral")
    copy = _copy(original, tmp_path / "copy")
    remade = make_test_checkpoint("mixtral", tmp_path / "remade", seed=0, tokenizer=tokenizer)
    assert covers_weights(original)
    assert model_id(copy) == model_id(original)
    assert model_id(remade) == model_id(original)
    assert (remade / MANIFEST_FILE).read_bytes() == (original / MANIFEST_FILE).read_bytes()


def test_manifest_changes_id(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    original = checkpoint("mixtral")
    bare = _copy(original, tmp_path / "bare", manifest=False)
    assert not covers_weights(bare)
    assert model_id(bare) != model_id(original)  # a copy without the manifest never mixes with it


def test_changed_weight_changes_id(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    original = checkpoint("deepseek_v3")
    changed = _copy(original, tmp_path / "changed")
    shard = _shard_of(changed, TAMPERED)
    tensors = load_file(str(shard))
    tensors[TAMPERED][0, 0] += 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    write_manifest(Checkpoint(changed), terminal=False)
    assert model_id(changed) != model_id(original)

    # Without manifests the ids are equal: that is the gap the manifest closes.
    bare_original = _copy(original, tmp_path / "original-bare", manifest=False)
    bare_changed = _copy(changed, tmp_path / "changed-bare", manifest=False)
    assert model_id(bare_changed) == model_id(bare_original)


def test_changed_row_changes_fused_id(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    original = checkpoint("deepseek_v3", fused=True)
    changed = _copy(original, tmp_path / "changed")
    name = "model.layers.2.mlp.experts.down_proj"
    shard = _shard_of(changed, name)
    start, _ = _data_range(shard, name)
    _flip_byte(shard, start + 7)
    write_manifest(Checkpoint(changed), terminal=False)
    assert model_id(changed) != model_id(original)
    old, new = read_manifest(original), read_manifest(changed)
    assert old is not None and new is not None
    assert len(new.tensors[name].row_sha256) == 16
    assert new.tensors[name].row_sha256[1:] == old.tensors[name].row_sha256[1:]
    assert new.tensors[name].row_sha256[0] != old.tensors[name].row_sha256[0]


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda t: t[TAMPERED].update(shape=[33, 64]),
            TAMPERED_PATTERN + r" is F32 \[32, 64\] in the shard header but F32 \[33, 64\]",
        ),
        (lambda t: t[TAMPERED].update(dtype="BF16"), TAMPERED_PATTERN + r" is F32 \[32, 64\] in the shard header but BF16"),
        (lambda t: t.pop(TAMPERED), TAMPERED_PATTERN + r" is in the shards .* but not in"),
        (
            lambda t: t.update({"extra.weight": t[TAMPERED]}),
            r"lists 1 tensors that the checkpoint does not have \(e\.g\. 'extra\.weight'\)",
        ),
    ],
    ids=["shape", "dtype", "missing", "extra"],
)
def test_manifest_disagreeing_with_headers(
    checkpoint: CheckpointFactory, tmp_path: Path, edit: Any, pattern: str
) -> None:
    folder = _copy(checkpoint("deepseek_v3"), tmp_path / "edited")
    _edit_manifest(folder, edit)
    with pytest.raises(ManifestError, match=pattern) as raised:
        model_id(folder)
    assert f"cortex model manifest {folder}" in str(raised.value)


def test_manifest_disagreement_stops_load(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = _copy(checkpoint("deepseek_v3"), tmp_path / "edited")
    _edit_manifest(folder, lambda t: t[TAMPERED].update(shape=[33, 64]))
    loader = Loader(folder, device="cpu")
    with pytest.raises(ManifestError, match=r"up_proj\.weight' is F32 \[32, 64\] in the shard header"):
        loader.load("expert[1][3]")
    assert isinstance(loader.load("expert[1][4]"), Expert)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("{not json", r"is not readable JSON"),
        ('{"format": "cortex-manifest/9", "tensors": {}}', r"has format 'cortex-manifest/9', expected 'cortex-manifest/1'"),
        ('{"format": "cortex-manifest/1", "tensors": {"w": {"dtype": "F32", "shape": [2], "sha256": "xyz"}}}', r"invalid entry for tensor 'w'"),
        (
            '{"format": "cortex-manifest/1", "tensors": {"w": {"dtype": "F32", "shape": [2, 1, 1], "sha256": "' + "0" * 64 + '"}}}',
            r"lists 0 row digests for tensor 'w' of shape \[2, 1, 1\], expected 2",
        ),
    ],
    ids=["json", "format", "digest", "rows"],
)
def test_invalid_manifest_names_file(tmp_path: Path, text: str, pattern: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(ManifestError, match=pattern) as raised:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_FILE) in str(raised.value)
    assert "cortex model manifest" in str(raised.value)


_DIGESTS = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def _entries(draw: st.DrawFn) -> TensorEntry:
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    rows = tuple(draw(st.lists(_DIGESTS, min_size=shape[0], max_size=shape[0]))) if len(shape) >= 3 else ()
    return TensorEntry(draw(st.sampled_from(["F32", "BF16", "F8_E4M3"])), shape, draw(_DIGESTS), rows)


@given(st.dictionaries(st.text(min_size=1, max_size=20), _entries(), max_size=6))
def test_manifest_text_round_trip(tensors: dict[str, TensorEntry]) -> None:
    manifest = Manifest(tensors)
    assert json.loads(manifest.to_text()) == manifest.to_json()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / MANIFEST_FILE).write_text(manifest.to_text())
        assert read_manifest(folder) == manifest


# -- verified loads --------------------------------------------------------------


def test_tampered_tensor_fails_only_its_load(
    checkpoint: CheckpointFactory, tmp_path: Path, reads: list[str]
) -> None:
    folder = _copy(checkpoint("deepseek_v3"), tmp_path / "tampered")
    listed = read_manifest(folder)
    assert listed is not None
    expected = listed.tensors[TAMPERED].sha256
    shard = _shard_of(folder, TAMPERED)
    start, stop = _data_range(shard, TAMPERED)
    _flip_byte(shard, start + 100)
    actual = hashlib.sha256(shard.read_bytes()[start:stop]).hexdigest()
    assert actual != expected

    loader = Loader(folder, device="cpu")
    identity = model_id(loader.checkpoint)  # headers and manifest agree, so the id is the published one
    assert identity == model_id(checkpoint("deepseek_v3"))
    with pytest.raises(DigestMismatchError) as raised:
        loader.load("expert[1][3]")
    message = str(raised.value)
    assert f"tensor {TAMPERED!r} in {shard}" in message
    assert f"has SHA-256 {actual}" in message
    assert f"lists {expected}" in message
    assert "re-download the checkpoint" in message

    # Every other fragment loads, and reads exactly its own tensors: verification adds no reads.
    specs = ["head", "block[0:3]"] + [f"expert[{layer}][{e}]" for layer in (1, 2) for e in range(16) if (layer, e) != (1, 3)]
    for spec in specs:
        reads.clear()
        loader.load(spec)
        assert sorted(reads) == sorted(loader.fragment_tensors(spec))
        assert TAMPERED not in reads


def test_tampered_row_fails_only_its_expert(
    checkpoint: CheckpointFactory, tmp_path: Path, reads: list[str]
) -> None:
    folder = _copy(checkpoint("deepseek_v3", fused=True), tmp_path / "tampered")
    name = "model.layers.2.mlp.experts.gate_up_proj"
    shard = _shard_of(folder, name)
    start, stop = _data_range(shard, name)
    row_bytes = (stop - start) // 16
    _flip_byte(shard, start + 5 * row_bytes + 3)

    loader = Loader(folder, device="cpu")
    with pytest.raises(DigestMismatchError, match=rf"row block 5 of tensor '{name}' in .*{shard.name} has SHA-256"):
        loader.load("expert[2][5]")
    for expert in (4, 6):
        reads.clear()
        assert isinstance(loader.load(f"expert[2][{expert}]"), Expert)
        assert sorted(reads) == ["model.layers.2.mlp.experts.down_proj", name]
    with pytest.raises(DigestMismatchError, match=rf"tensor '{name}' in .* has SHA-256"):
        Checkpoint(folder).tensor(name)


def test_verified_reads_count_same_bytes(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    with_manifest = checkpoint("deepseek_v3", fused=True)
    without = _copy(with_manifest, tmp_path / "bare", manifest=False)
    counts = []
    for folder in (with_manifest, without):
        loader = Loader(folder, device="cpu")
        loader.load("expert[1][2]")
        loader.load("head")
        counts.append(loader.checkpoint.bytes_read)
    expert_bytes = (64 * 64 + 64 * 32) * 4  # one row block of gate_up_proj [64, 64] and down_proj [64, 32]
    head_bytes = (2 * 512 * 64 + 64) * 4  # embeddings, LM head, final norm
    assert counts[0] == counts[1] == expert_bytes + head_bytes


def test_verified_load_matches_unverified(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    with_manifest = checkpoint("qwen2_moe")
    without = _copy(with_manifest, tmp_path / "bare", manifest=False)
    first = Loader(with_manifest, device="cpu").load("expert[1][0]")
    second = Loader(without, device="cpu").load("expert[1][0]")
    assert isinstance(first, Expert) and isinstance(second, Expert)
    assert torch.equal(first.mlp.gate_up, second.mlp.gate_up)
    assert torch.equal(first.mlp.down, second.mlp.down)


# -- writing and checking manifests ---------------------------------------------------


def test_make_test_writes_manifest(tmp_path: Path, tokenizer: Any) -> None:
    with_manifest = make_test_checkpoint("llama", tmp_path / "with", seed=1, tokenizer=tokenizer)
    without = make_test_checkpoint("llama", tmp_path / "without", seed=1, tokenizer=tokenizer, manifest=False)
    listed = read_manifest(with_manifest)
    assert listed is not None
    assert set(listed.tensors) == set(Checkpoint(with_manifest).weight_map)
    assert not (without / MANIFEST_FILE).exists()
    assert not list(with_manifest.glob(f".{MANIFEST_FILE}.*"))  # no temporary file left behind


def test_manifest_write_reports_progress(
    checkpoint: CheckpointFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy(checkpoint("olmoe"), tmp_path / "olmoe", manifest=False)
    monkeypatch.setattr(progress_module, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cortex.runtime.progress"):
        write_manifest(Checkpoint(folder), terminal=False)
    messages = [r.getMessage() for r in caplog.records]
    assert messages
    assert all(m.startswith("loading olmoe for its manifest: ") for m in messages)
    assert messages[-1].endswith("(100%)")


def test_manifest_write_failure_leaves_old_file(
    checkpoint: CheckpointFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy(checkpoint("olmoe"), tmp_path / "olmoe")
    before = (folder / MANIFEST_FILE).read_bytes()

    def fail(source: Any, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifest_module.os, "replace", fail)
    with pytest.raises(ManifestError, match=r"writing .*cortex-manifest\.json failed \(.*No space left on device\)"):
        write_manifest(Checkpoint(folder), terminal=False)
    assert (folder / MANIFEST_FILE).read_bytes() == before
    assert not list(folder.glob(f".{MANIFEST_FILE}.*"))


def test_manifest_digests_stored_bytes(checkpoint: CheckpointFactory) -> None:
    folder = checkpoint("deepseek_v3", fused=True)
    listed = read_manifest(folder)
    assert listed is not None
    for name in ("model.norm.weight", "model.layers.1.mlp.experts.down_proj"):
        shard = _shard_of(folder, name)
        start, stop = _data_range(shard, name)
        raw = shard.read_bytes()[start:stop]
        assert listed.tensors[name].sha256 == hashlib.sha256(raw).hexdigest()
    rows = listed.tensors["model.layers.1.mlp.experts.down_proj"].row_sha256
    start, stop = _data_range(_shard_of(folder, "model.layers.1.mlp.experts.down_proj"), "model.layers.1.mlp.experts.down_proj")
    step = (stop - start) // 16
    raw = _shard_of(folder, "model.layers.1.mlp.experts.down_proj").read_bytes()
    assert list(rows) == [hashlib.sha256(raw[start + i * step : start + (i + 1) * step]).hexdigest() for i in range(16)]


def test_manifest_command_writes_and_checks(
    checkpoint: CheckpointFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(checkpoint("deepseek_v3", fused=True), tmp_path / "model", manifest=False)
    assert main(["model", "manifest", "--check", str(folder)]) == 1
    assert f"{folder / MANIFEST_FILE} not found" in capsys.readouterr().err

    assert main(["model", "manifest", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / MANIFEST_FILE}" in out
    assert f"model id: {model_id(folder)}" in out
    assert main(["model", "manifest", "--check", str(folder)]) == 0
    assert f"all {len(Checkpoint(folder).weight_map)} tensors match" in capsys.readouterr().out

    name = "model.layers.1.mlp.experts.gate_up_proj"
    shard = _shard_of(folder, name)
    start, stop = _data_range(shard, name)
    _flip_byte(shard, start + 2 * (stop - start) // 16)
    _flip_byte(shard, _data_range(shard, name)[1] - 1)
    assert main(["model", "manifest", "--check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "differs from the shards in 1 tensors" in out
    assert f"{name}: manifest has SHA-256" in out
    assert "(row blocks 2, 15 differ)" in out


def test_manifest_check_reports_header_changes(
    checkpoint: CheckpointFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(checkpoint("llama"), tmp_path / "model")
    _edit_manifest(folder, lambda t: t["model.norm.weight"].update(shape=[65]))
    _edit_manifest(folder, lambda t: t.pop("lm_head.weight"))
    assert main(["model", "manifest", "--check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "model.norm.weight: manifest has F32 [65], checkpoint has F32 [64]" in out
    assert "lm_head.weight: in the checkpoint but not in the manifest" in out


def test_model_info_says_whether_weights_are_covered(
    checkpoint: CheckpointFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = checkpoint("llama")
    assert main(["model", "info", str(folder)]) == 0
    assert "weights:        covered by the id (cortex-manifest.json" in capsys.readouterr().out
    bare = _copy(folder, tmp_path / "bare", manifest=False)
    assert main(["model", "info", str(bare)]) == 0
    assert "not covered by the id" in capsys.readouterr().out


def test_demo_model_manifest_is_current() -> None:
    listed = read_manifest(DEMO_MODEL_DIR)
    assert listed is not None, f"{DEMO_MODEL_DIR} has no {MANIFEST_FILE}; run `cortex model manifest {DEMO_MODEL_DIR}`"
    assert compare_manifests(listed, compute_manifest(Checkpoint(DEMO_MODEL_DIR), terminal=False)) == []
    assert covers_weights(DEMO_MODEL_DIR)
