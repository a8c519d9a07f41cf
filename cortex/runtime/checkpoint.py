"""Lazy, per-tensor access to a Hugging Face checkpoint folder.

A checkpoint folder contains `config.json`, one `model.safetensors` or several
shards listed in `model.safetensors.index.json` (`{"metadata": ..., "weight_map":
{tensor name: shard file}}`), and usually `tokenizer.json`. `Checkpoint` opens a
shard only when a tensor in it is first requested and reads tensors one by one
with `safetensors.safe_open`, so a node that serves one expert reads that
expert's bytes and not the whole file. A slice of a fused expert tensor is read
with `get_slice`, which touches only the requested rows.

FP8 checkpoints (DeepSeek-V3 as published) store linear weights as
`float8_e4m3fn` next to a float32 `<name>_scale_inv` tensor with one scale per
block of `weight_block_size` (128 x 128 in DeepSeek-V3) and declare
`quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}`
in `config.json`. They are dequantized here, at load time:
`weight[i, j] = fp8[i, j] * scale_inv[i // block_rows, j // block_cols]`.

When the folder has a tensor manifest (`cortex-manifest.json`, see
`cortex.runtime.manifest`), every tensor or row block read here is checked
against its SHA-256 in the manifest before dequantization. The check hashes the
bytes already read, so it adds no I/O, and a tampered or corrupt tensor raises
`DigestMismatchError`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cortex.runtime import manifest as manifest_module
from cortex.runtime.errors import (
    CheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnsupportedModelError,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names that load as they are, with their element sizes in bytes.
PLAIN_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
FP8_DTYPE = "F8_E4M3"
SUPPORTED_QUANTIZATION = "fp8 (block-wise float8_e4m3fn weights with <name>_scale_inv scales)"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry: its shard file, safetensors dtype name and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * (1 if self.dtype == FP8_DTYPE else PLAIN_DTYPES.get(self.dtype, 4))


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Return `weight` (float8_e4m3fn, [O, I]) times its per-block scales as float32 [O, I].

    `scale_inv` is [ceil(O / block[0]), ceil(I / block[1])]; the last block in
    each dimension may be partial.
    """
    rows, cols = weight.shape
    expanded = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    expanded = expanded.repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * expanded


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found; a checkpoint folder needs it next to the *.safetensors files") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}); re-download or re-save the checkpoint") from None


class Checkpoint:
    """A checkpoint folder whose tensors are read on request, one at a time.

    `bytes_read` counts the tensor bytes handed out so far (before dequantization),
    which is what a lazy load costs in I/O. `manifest` is the folder's tensor
    manifest, or None when it has none.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.path} not found; pass the folder that contains config.json and *.safetensors"
            )
        self.bytes_read = 0
        self._handles: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        self.config: dict[str, Any] = _read_json(self.path / CONFIG_FILE)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.path / CONFIG_FILE} contains a JSON {type(self.config).__name__}, expected an object")
        self.weight_map: dict[str, str] = {}
        self.weight_map = self._read_weight_map()
        self.fp8_block = self._read_quantization()
        self._manifest: manifest_module.Manifest | None = None
        self._manifest_read = False

    @property
    def manifest(self) -> manifest_module.Manifest | None:
        """The folder's tensor manifest, read on first use; None when the folder has none."""
        if not self._manifest_read:
            self._manifest = manifest_module.read_manifest(self.path)
            self._manifest_read = True
        return self._manifest

    def _verify(self, name: str, info: TensorInfo, tensor: torch.Tensor, row: int | None = None) -> None:
        manifest = self.manifest
        if manifest is None:
            return
        entry = manifest_module.check_entry(manifest, name, info.dtype, info.shape, self.path)
        manifest_module.verify_tensor(entry, tensor, name, self.path / info.file, row)

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            index = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no 'weight_map' object; re-save the checkpoint")
            return {str(name): str(file) for name, file in weight_map.items()}
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no *.safetensors files in {self.path}; download the weights or pass the right folder"
            )
        if len(files) > 1 and SINGLE_FILE not in files:
            logger.warning("%s has %d shards but no %s; building the map from their headers", self.path, len(files), INDEX_FILE)
        weight_map = {}
        for file in files if SINGLE_FILE not in files else [SINGLE_FILE]:
            for name in self._handle(file).keys():
                weight_map[name] = file
        return weight_map

    def _read_quantization(self) -> tuple[int, int] | None:
        quantization = self.config.get("quantization_config")
        if quantization is None:
            return None
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method != "fp8":
            raise UnsupportedModelError(
                f"quantization method {method!r} in {self.path / CONFIG_FILE} is not supported; "
                f"Cortex loads {SUPPORTED_QUANTIZATION}, so use an unquantized or FP8 checkpoint"
            )
        fmt = quantization.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UnsupportedModelError(f"FP8 format {fmt!r} is not supported; only e4m3 (float8_e4m3fn) is")
        block = quantization.get("weight_block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise UnsupportedModelError(
                f"weight_block_size {block!r} is not supported; FP8 checkpoints need two positive block sizes"
            )
        return (block[0], block[1])

    def _handle(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            path = self.path / file
            if not path.exists():
                users = [name for name, f in self.weight_map.items() if f == file]
                example = f" (e.g. {users[0]!r})" if users else ""
                raise CheckpointError(
                    f"shard {path} is missing but {INDEX_FILE} maps {len(users)} tensors to it{example}; "
                    "re-download the checkpoint"
                )
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path} is not a readable safetensors file ({error}); re-download it") from None
            self._handles[file] = handle
        return handle

    def has(self, name: str) -> bool:
        """Return whether the checkpoint lists tensor `name`."""
        return name in self.weight_map

    def info(self, name: str) -> TensorInfo:
        """Return the header entry of tensor `name` without reading its data."""
        cached = self._infos.get(name)
        if cached is not None:
            return cached
        file = self.weight_map.get(name)
        if file is None:
            raise MissingTensorError(
                f"tensor {name!r} not found in {self.path} ({len(self.weight_map)} tensors listed); the checkpoint "
                "is incomplete or config.json describes another model, so re-download it or fix config.json"
            )
        handle = self._handle(file)
        try:
            tensor_slice = handle.get_slice(name)
        except SafetensorError:
            raise MissingTensorError(
                f"tensor {name!r} is mapped to {self.path / file} by {INDEX_FILE} but that file does not contain it; "
                "re-download the checkpoint"
            ) from None
        info = TensorInfo(file=file, dtype=tensor_slice.get_dtype(), shape=tuple(tensor_slice.get_shape()))
        self._infos[name] = info
        return info

    def _check_dtype(self, name: str, info: TensorInfo) -> None:
        if info.dtype in PLAIN_DTYPES:
            return
        if info.dtype == FP8_DTYPE:
            if not self.has(name + "_scale_inv"):
                raise UnsupportedModelError(
                    f"tensor {name!r} in {self.path / info.file} is float8_e4m3fn but has no {name + '_scale_inv'!r}; "
                    f"Cortex loads {SUPPORTED_QUANTIZATION}"
                )
            return
        raise UnsupportedModelError(
            f"tensor {name!r} in {self.path / info.file} has dtype {info.dtype}, which Cortex does not load; "
            f"supported: {', '.join(PLAIN_DTYPES)} and {SUPPORTED_QUANTIZATION}"
        )

    def _check_shape(self, name: str, shape: tuple[int, ...], expected: tuple[int, ...] | None) -> None:
        if expected is not None and tuple(shape) != tuple(expected):
            raise ShapeMismatchError(
                f"tensor {name!r} in {self.path / self.weight_map[name]} has shape {list(shape)} but "
                f"{self.path / CONFIG_FILE} implies {list(expected)}; the config does not match the weights, "
                "so use the config.json that was saved with them"
            )

    def tensor(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read tensor `name`, dequantizing FP8 weights to float32, and check its shape."""
        info = self.info(name)
        self._check_dtype(name, info)
        self._check_shape(name, info.shape, expected_shape)
        tensor = self._handle(info.file).get_tensor(name)
        self.bytes_read += info.nbytes
        self._verify(name, info, tensor)
        if info.dtype == FP8_DTYPE:
            scale = self.tensor(name + "_scale_inv")
            tensor = dequantize_fp8_blockwise(tensor, scale, self.fp8_block or (128, 128))
        logger.debug("read %s %s from %s", name, list(info.shape), info.file)
        return tensor

    def rows(self, name: str, index: int, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read `tensor[index]` of a tensor stacked on its first dimension (a fused expert tensor).

        Only that row block is read. `expected_shape` is the shape of one row block.
        """
        info = self.info(name)
        if info.dtype not in PLAIN_DTYPES:
            raise UnsupportedModelError(
                f"fused tensor {name!r} in {self.path / info.file} has dtype {info.dtype}; fused expert tensors "
                f"load only as {', '.join(PLAIN_DTYPES)}, so use the per-expert layout for quantized weights"
            )
        if not 0 <= index < info.shape[0]:
            raise MissingTensorError(
                f"index {index} is out of range for tensor {name!r} of shape {list(info.shape)} in "
                f"{self.path / info.file}; config.json lists more experts than the weights hold"
            )
        self._check_shape(name, info.shape[1:], expected_shape)
        tensor = self._handle(info.file).get_slice(name)[index : index + 1][0]
        self.bytes_read += tensor.numel() * tensor.element_size()
        self._verify(name, info, tensor, row=index)
        logger.debug("read %s[%d] %s from %s", name, index, list(tensor.shape), info.file)
        return tensor

    def close(self) -> None:
        """Drop the open shard handles; later reads reopen them."""
        self._handles.clear()
