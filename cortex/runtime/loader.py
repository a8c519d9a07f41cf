"""The Loader: builds fragments from exactly the checkpoint tensors they need.

`Loader(checkpoint_dir, device, dtype)` reads `config.json`, checks that the
architecture is supported, and then loads fragments on request:

    loader = Loader("path/to/checkpoint", device="cpu", dtype="float32")
    head = loader.load("head")
    block = loader.load("block[0:2]")
    expert = loader.load("expert[1][5]")

Each load reads only its own tensors, one by one (see `Checkpoint`), converts
them to the fragment's device and dtype, and logs the memory the fragment takes.
Router weights and DeepSeek's correction bias stay in float32 where transformers
keeps them in float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cortex.runtime.architectures import Architecture, architecture_for
from cortex.runtime.checkpoint import CONFIG_FILE, FP8_DTYPE, Checkpoint
from cortex.runtime.devices import resolve_device, resolve_dtype
from cortex.runtime.errors import CheckpointError
from cortex.runtime.fragments import Block, Expert, Head
from cortex.runtime.layers import DecoderLayer, GatedMLP, activation, build_module, fill_module
from cortex.runtime.progress import MIB, LoadProgress
from cortex.runtime.routing import build_router
from cortex.runtime.spec import BlockSpec, ExpertSpec, FragmentSpec, HeadSpec, check_fragment_spec, parse_fragment_spec

logger = logging.getLogger(__name__)

Fragment = Head | Block | Expert


@dataclass(frozen=True)
class _TensorRead:
    """One tensor read for a fragment: its name, the row of a fused tensor, and its expected shape."""

    name: str
    shape: tuple[int, ...]
    row: int | None = None
    float32: bool = False  # keep in float32 whatever the model dtype


def load_transformers_config(path: Path) -> Any:
    """Read `config.json` with transformers, which fills in defaults and rope parameters."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path / CONFIG_FILE} could not be read by transformers: {error}") from None
    config._attn_implementation = "sdpa"
    return config


class Loader:
    """Fragment factory of one checkpoint: `head`, `block[a:b]` and `expert[l][e]`."""

    def __init__(
        self,
        checkpoint: str | Path | Checkpoint,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        terminal: bool | None = None,
    ) -> None:
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        self.arch: Architecture = architecture_for(
            self.checkpoint.config.get("model_type"), source=str(self.checkpoint.path / CONFIG_FILE)
        )
        self.config = load_transformers_config(self.checkpoint.path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.terminal = terminal
        self._shared_progress: LoadProgress | None = None
        self.num_layers = int(self.config.num_hidden_layers)
        self.num_experts = self.arch.num_experts(self.config)
        self.hidden_size = int(self.config.hidden_size)
        self.act = activation(self.config.hidden_act)

    def is_moe_layer(self, layer: int) -> bool:
        return self.arch.is_moe_layer(self.config, layer)

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.is_moe_layer(layer)]

    def load(self, spec: str | FragmentSpec) -> Fragment:
        """Load the fragment that `spec` names (`head`, `block[a:b]` or `expert[l][e]`)."""
        parsed = parse_fragment_spec(spec) if isinstance(spec, str) else spec
        check_fragment_spec(parsed, self.num_layers, self.is_moe_layer, self.num_experts)
        if isinstance(parsed, HeadSpec):
            return self.load_head()
        if isinstance(parsed, BlockSpec):
            return self.load_block(parsed.start, parsed.stop)
        return self.load_expert(parsed.layer, parsed.expert)

    def fragment_tensors(self, spec: str | FragmentSpec) -> list[str]:
        """Return the checkpoint tensors that loading `spec` reads, without reading them.

        A fused expert tensor is listed as `name[e]`, the row block the expert reads.
        """
        return [item.name if item.row is None else f"{item.name}[{item.row}]" for item in self._fragment_reads(spec)]

    def fragment_nbytes(self, spec: str | FragmentSpec) -> int:
        """Return the checkpoint bytes that loading `spec` reads (at the checkpoint's dtypes)."""
        return sum(self._read_nbytes(item) for item in self._fragment_reads(spec))

    def _fragment_reads(self, spec: str | FragmentSpec) -> list[_TensorRead]:
        parsed = parse_fragment_spec(spec) if isinstance(spec, str) else spec
        check_fragment_spec(parsed, self.num_layers, self.is_moe_layer, self.num_experts)
        if isinstance(parsed, HeadSpec):
            return self._head_reads()
        if isinstance(parsed, ExpertSpec):
            return self._expert_reads(parsed.layer, parsed.expert)[0]
        reads = []
        for layer in range(parsed.start, parsed.stop):
            reads += self._layer_reads(layer, build_module(self.arch, "Attention", self.config, layer))
        return reads

    # -- reading --------------------------------------------------------------

    @contextmanager
    def shared_progress(self, description: str, total_bytes: int) -> Iterator[LoadProgress]:
        """Report the fragments loaded inside this context as one load of `total_bytes`."""
        with LoadProgress(description, total_bytes, self.terminal) as progress:
            self._shared_progress = progress
            try:
                yield progress
            finally:
                self._shared_progress = None

    def _read(self, reads: list[_TensorRead], description: str) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        context: AbstractContextManager[LoadProgress]
        if self._shared_progress is not None:
            context = nullcontext(self._shared_progress)
        else:
            context = LoadProgress(description, sum(self._read_nbytes(item) for item in reads), self.terminal)
        with context as progress:
            for item in reads:
                if item.row is None:
                    tensor = self.checkpoint.tensor(item.name, item.shape)
                else:
                    tensor = self.checkpoint.rows(item.name, item.row, item.shape)
                dtype = torch.float32 if item.float32 else self.dtype
                key = item.name if item.row is None else f"{item.name}[{item.row}]"
                # A copy, not a view into the mapped file: the load does the disk reads (not the
                # first forward pass), and a shard rewritten on disk cannot fault a running node.
                tensors[key] = tensor.to(device=self.device, dtype=dtype, copy=True)
                progress.advance(self._read_nbytes(item))
        return tensors

    def _read_nbytes(self, item: _TensorRead) -> int:
        info = self.checkpoint.info(item.name)
        if item.row is not None:
            return info.nbytes // max(info.shape[0], 1)
        scale = item.name + "_scale_inv"  # read with an FP8 weight
        if info.dtype == FP8_DTYPE and self.checkpoint.has(scale):
            return info.nbytes + self.checkpoint.info(scale).nbytes
        return info.nbytes

    def _log_loaded(self, fragment: Fragment, started: float) -> None:
        # Experts come by the hundred, so each gets a debug line and their holder logs a summary.
        logger.log(
            logging.DEBUG if isinstance(fragment, Expert) else logging.INFO,
            "loaded %s from %s: %.2f MiB on %s as %s in %.2f s",
            fragment.spec,
            self.checkpoint.path.name,
            fragment.nbytes / MIB,
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.monotonic() - started,
        )

    # -- head -----------------------------------------------------------------

    def _head_reads(self) -> list[_TensorRead]:
        vocab, hidden = int(self.config.vocab_size), self.hidden_size
        reads = [_TensorRead("model.embed_tokens.weight", (vocab, hidden)), _TensorRead("model.norm.weight", (hidden,))]
        if not self._tied_embeddings():
            reads.append(_TensorRead("lm_head.weight", (vocab, hidden)))
        return reads

    def _tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) and not self.checkpoint.has("lm_head.weight")

    def load_head(self) -> Head:
        """Load the token embeddings, the final norm and the LM head."""
        started = time.monotonic()
        tensors = self._read(self._head_reads(), "head")
        norm = fill_module(
            build_module(self.arch, "RMSNorm", self.hidden_size, self.config.rms_norm_eps),
            {"weight": tensors["model.norm.weight"]},
        )
        embed = tensors["model.embed_tokens.weight"]
        head = Head(embed, norm, embed if self._tied_embeddings() else tensors["lm_head.weight"])
        self._log_loaded(head, started)
        return head

    # -- experts --------------------------------------------------------------

    def _moe_prefix(self, layer: int) -> str:
        """Return the MoE module prefix of `layer`: Mixtral's original name or `mlp`."""
        original = f"model.layers.{layer}.{self.arch.moe_prefix}"
        if self.arch.moe_prefix != "mlp" and self.checkpoint.has(f"{original}.gate.weight"):
            return original
        return f"model.layers.{layer}.mlp"

    def _expert_reads(self, layer: int, index: int) -> tuple[list[_TensorRead], bool]:
        inter, hidden = self.arch.expert_intermediate_size(self.config), self.hidden_size
        fused = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        if self.checkpoint.has(fused):
            down = f"model.layers.{layer}.mlp.experts.down_proj"
            return [_TensorRead(fused, (2 * inter, hidden), row=index), _TensorRead(down, (hidden, inter), row=index)], True
        prefix = f"{self._moe_prefix(layer)}.experts.{index}"
        gate, up, down = self.arch.expert_projections
        return [
            _TensorRead(f"{prefix}.{gate}.weight", (inter, hidden)),
            _TensorRead(f"{prefix}.{up}.weight", (inter, hidden)),
            _TensorRead(f"{prefix}.{down}.weight", (hidden, inter)),
        ], False

    def load_expert(self, layer: int, index: int) -> Expert:
        """Load routed expert `index` of MoE layer `layer`, from either expert layout."""
        check_fragment_spec(ExpertSpec(layer, index), self.num_layers, self.is_moe_layer, self.num_experts)
        started = time.monotonic()
        reads, fused = self._expert_reads(layer, index)
        tensors = list(self._read(reads, f"expert[{layer}][{index}]").values())
        if fused:
            gate_up, down = tensors
        else:
            gate_up, down = torch.cat([tensors[0], tensors[1]], dim=0), tensors[2]  # [2I, D]
        expert = Expert(layer, index, GatedMLP(gate_up, down, self.act))
        self._log_loaded(expert, started)
        return expert

    # -- blocks ---------------------------------------------------------------

    def load_block(self, start: int, stop: int) -> Block:
        """Load decoder layers `start` to `stop - 1`: attention, dense MLPs, routers and shared experts."""
        check_fragment_spec(BlockSpec(start, stop), self.num_layers, self.is_moe_layer, self.num_experts)
        started = time.monotonic()
        layers = []
        for layer in range(start, stop):
            layers.append(self._load_layer(layer, f"block[{start}:{stop}] layer {layer}"))
        with torch.device(self.device):
            rotary = self.arch.transformers_class("RotaryEmbedding")(config=self.config)
        block = Block(start, stop, layers, rotary.eval())
        self._log_loaded(block, started)
        return block

    def _layer_reads(self, layer: int, attention: nn.Module) -> list[_TensorRead]:
        prefix = f"model.layers.{layer}"
        reads = [
            _TensorRead(f"{prefix}.self_attn.{key}", tuple(value.shape)) for key, value in attention.state_dict().items()
        ]
        reads += [
            _TensorRead(f"{prefix}.input_layernorm.weight", (self.hidden_size,)),
            _TensorRead(f"{prefix}.post_attention_layernorm.weight", (self.hidden_size,)),
        ]
        reads += self._moe_reads(layer) if self.is_moe_layer(layer) else self._dense_reads(layer)
        return reads

    def _load_layer(self, layer: int, description: str) -> DecoderLayer:
        prefix = f"model.layers.{layer}"
        hidden = self.hidden_size
        attention = build_module(self.arch, "Attention", self.config, layer)
        attention_shapes = {key: tuple(value.shape) for key, value in attention.state_dict().items()}
        moe = self.is_moe_layer(layer)
        tensors = self._read(self._layer_reads(layer, attention), description)

        fill_module(attention, {key: tensors[f"{prefix}.self_attn.{key}"] for key in attention_shapes})
        norms = [
            fill_module(
                build_module(self.arch, "RMSNorm", hidden, self.config.rms_norm_eps),
                {"weight": tensors[f"{prefix}.{name}.weight"]},
            )
            for name in ("input_layernorm", "post_attention_layernorm")
        ]
        window = getattr(attention, "sliding_window", None)
        if self.arch.model_type == "mixtral":
            window = getattr(self.config, "sliding_window", None)
        decoder = DecoderLayer(layer, norms[0], attention, norms[1], window=window or None)
        if moe:
            self._fill_moe(decoder, layer, tensors)
        else:
            decoder.mlp = self._mlp(f"{prefix}.mlp", tensors)
        return decoder

    def _mlp_reads(self, prefix: str, inter: int, bias: bool) -> list[_TensorRead]:
        hidden = self.hidden_size
        reads = [
            _TensorRead(f"{prefix}.gate_proj.weight", (inter, hidden)),
            _TensorRead(f"{prefix}.up_proj.weight", (inter, hidden)),
            _TensorRead(f"{prefix}.down_proj.weight", (hidden, inter)),
        ]
        if bias:
            reads += [
                _TensorRead(f"{prefix}.gate_proj.bias", (inter,)),
                _TensorRead(f"{prefix}.up_proj.bias", (inter,)),
                _TensorRead(f"{prefix}.down_proj.bias", (hidden,)),
            ]
        return reads

    def _mlp(self, prefix: str, tensors: dict[str, torch.Tensor]) -> GatedMLP:
        gate_up = torch.cat([tensors[f"{prefix}.gate_proj.weight"], tensors[f"{prefix}.up_proj.weight"]], dim=0)
        gate_up_bias = down_bias = None
        if f"{prefix}.gate_proj.bias" in tensors:
            gate_up_bias = torch.cat([tensors[f"{prefix}.gate_proj.bias"], tensors[f"{prefix}.up_proj.bias"]])
            down_bias = tensors[f"{prefix}.down_proj.bias"]
        return GatedMLP(gate_up, tensors[f"{prefix}.down_proj.weight"], self.act, gate_up_bias, down_bias)

    def _dense_reads(self, layer: int) -> list[_TensorRead]:
        bias = bool(getattr(self.config, "mlp_bias", False))
        return self._mlp_reads(f"model.layers.{layer}.mlp", int(self.config.intermediate_size), bias)

    def _moe_reads(self, layer: int) -> list[_TensorRead]:
        prefix = self._moe_prefix(layer)
        float32 = self.arch.router_in_float32
        reads = [_TensorRead(f"{prefix}.gate.weight", (self.num_experts, self.hidden_size), float32=float32)]
        if self.arch.router == "SigmoidGroupRouter":
            reads.append(_TensorRead(f"{prefix}.gate.e_score_correction_bias", (self.num_experts,), float32=True))
        if self.arch.shared_expert and self.arch.shared_intermediate_size is not None:
            inter = self.arch.shared_intermediate_size(self.config)
            if inter > 0:
                reads += self._mlp_reads(f"{prefix}.{self.arch.shared_expert}", inter, bias=False)
            if self.arch.shared_expert_gated:
                reads.append(_TensorRead(f"{prefix}.shared_expert_gate.weight", (1, self.hidden_size)))
        return reads

    def _fill_moe(self, decoder: DecoderLayer, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        prefix = self._moe_prefix(layer)
        decoder.router = build_router(
            self.arch.router,
            self.arch.model_type,
            self.config,
            tensors[f"{prefix}.gate.weight"],
            tensors.get(f"{prefix}.gate.e_score_correction_bias"),
        )
        shared = f"{prefix}.{self.arch.shared_expert}"
        if self.arch.shared_expert and f"{shared}.gate_proj.weight" in tensors:
            decoder.shared_expert = self._mlp(shared, tensors)
        decoder.shared_expert_gate = tensors.get(f"{prefix}.shared_expert_gate.weight")
