"""Degraded mode: a light model that this node loads whole and generates with when the swarm cannot serve.

A node's config names a fallback model (`fallback_model`, the packaged demo model by
default; null turns it off). The node reads its checkpoint header at start (to announce its
model id under `FALLBACK_HARDWARE_KEY` in `PeerJoined`) and loads its weights lazily, on the
first degraded request, in the node's compute worker; it then stays loaded. The weights are
about 19 MB for the demo model, and most nodes never need them.

`FallbackModel.loop` returns a `DriverLoop` over the fallback's head and blocks with its
experts run in this process, so a degraded answer streams through the same code as a swarm
answer. docs/degraded.md gives the rules for when a request degrades.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex.driver.errors import DriverError
from cortex.driver.executors import Compute, LocalBlockExecutor, LocalExpertDispatcher, run_inline
from cortex.driver.loop import DriverLoop, Stage
from cortex.runtime.engine import LocalModel

logger = logging.getLogger(__name__)

# PeerJoined hardware key: the model id of the peer's fallback model (absent: no fallback).
FALLBACK_HARDWARE_KEY = "fallback_model"


class FallbackError(DriverError):
    """The fallback model is missing, cannot be loaded, or cannot take this request."""


@dataclass(frozen=True)
class LoadedFallback:
    """The fallback's weights, tokenizer, EOS ids and context length, once loaded."""

    model: LocalModel
    tokenizer: Any
    eos_token_ids: list[int]
    max_positions: int | None


class FallbackModel:
    """The light model of degraded mode: its id known at start, its weights loaded at first use."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str = "float32", compute: Compute = run_inline) -> None:
        from cortex.runtime.loader import Loader
        from cortex.runtime.model_id import model_id

        if not (path / "config.json").is_file():
            raise FallbackError(
                f"fallback_model {path} is not a checkpoint folder (no config.json); "
                "point fallback_model at one, or set it to null to run without degraded mode"
            )
        self.path = path
        self.device = device
        self.dtype = dtype
        self.compute = compute
        self.model_id = model_id(Loader(path, device="cpu", terminal=False).checkpoint)
        self._loaded: LoadedFallback | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def name(self) -> str:
        return self.path.name

    async def load(self) -> LoadedFallback:
        """Load the weights and tokenizer once (in the compute worker) and return them."""
        if self._loaded is not None:
            return self._loaded
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._loaded is None:
                try:
                    self._loaded = await self.compute(self._load_now)
                except (OSError, ValueError, KeyError) as error:
                    raise FallbackError(f"fallback model {self.path} could not be loaded: {error}") from error
                logger.info("loaded fallback model %s (%s)", self.name, self.model_id[:12])
        assert self._loaded is not None
        return self._loaded

    def _load_now(self) -> LoadedFallback:
        from transformers import AutoTokenizer

        from cortex.runtime.generation import _eos_ids

        model = LocalModel.load(self.path, device=self.device, dtype=self.dtype, terminal=False)
        tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        limit = getattr(model.config, "max_position_embeddings", None)
        return LoadedFallback(model, tokenizer, _eos_ids(tokenizer, model.config), limit if isinstance(limit, int) else None)

    def loop(self, loaded: LoadedFallback) -> DriverLoop:
        """Return a driver loop over the whole fallback model, experts run in this process."""
        model = loaded.model
        experts = {layer: model.experts_of(layer) for block in model.blocks for layer in block.moe_layers}
        dispatcher = LocalExpertDispatcher(experts, self.compute)
        stages = [Stage(LocalBlockExecutor(block, dispatcher, self.compute)) for block in model.blocks]
        return DriverLoop(model.head, stages, self.compute)


def open_fallback(path: Path | None, device: str, dtype: str, compute: Compute) -> FallbackModel | None:
    """Return the node's fallback model, or None when the config turns degraded mode off."""
    if path is None:
        return None
    return FallbackModel(path, device, dtype, compute)


def answer_locally(path: Path, prompt: str, max_tokens: int, settings: Any, stop: list[str], on_text: Any = None) -> Any:
    """Generate with the fallback model in this process, with no network; return a GenerationResult.

    `cortex submit --config` uses it when the node of that config could not start its bus,
    or the submitter's own bus cannot start (docs/degraded.md).
    """
    from transformers import AutoTokenizer

    from cortex.runtime.generation import generate_text

    model = LocalModel.load(path, device="cpu", terminal=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int):
        max_tokens = max(1, min(max_tokens, limit - len(tokenizer(prompt)["input_ids"])))
    return generate_text(model, tokenizer, prompt, max_tokens, settings, stop, on_text)
