"""Fragments: the separately runnable parts of a model.

Shape legend: T = tokens of one session in this call, D = hidden size,
V = vocabulary size, K = routed experts per token, I = expert intermediate size.
Every call handles one session; hidden states carry no batch dimension.

- `Head`: `embed(token_ids [T]) -> [T, D]` and `logits(hidden [T, D]) -> [T, V]`
  (final RMSNorm, then the LM head).
- `Block`: decoder layers `start` to `stop - 1` with one KV cache per session id.
  A block runs until it reaches an MoE layer, and there returns a `MoeCall`: the
  expert inputs [T, D] (the post-attention-normed hidden states) and the routing
  decision (`expert_ids` [T, K], `weights` [T, K]). It has already computed the
  router and the shared expert. The caller runs each token's routed experts
  wherever they live and passes their unweighted outputs [T, K, D], in the order
  of `expert_ids`, to `combine_and_continue`. The block weights and sums them,
  adds the shared expert and the residual, and runs on to the next MoE layer or
  to its end, where it returns `BlockOutput(hidden [T, D])`:

      step = block.forward_until_moe(session_id, hidden)
      while isinstance(step, MoeCall):
          outputs = run_experts(step.layer, step.hidden, step.routing)  # [T, K, D]
          step = block.combine_and_continue(session_id, outputs)
      hidden = step.hidden

- `Expert`: routed expert e of layer l, `expert(x [N, D]) -> [N, D]` for any
  batch of N token vectors. It keeps no state, so every replica returns the same output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cortex.runtime.errors import SessionError
from cortex.runtime.layers import DecoderLayer, GatedMLP, KVCache, attention_mask
from cortex.runtime.routing import RoutingDecision


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Head:
    """Token embeddings, the final norm and the LM head of a model."""

    def __init__(self, embed_tokens: torch.Tensor, norm: nn.Module, lm_head: torch.Tensor) -> None:
        self.embed_tokens = embed_tokens  # [V, D]
        self.norm = norm
        self.lm_head = lm_head  # [V, D], may be the same tensor as embed_tokens
        self.spec = "head"

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map token ids [T] to hidden states [T, D]."""
        return F.embedding(token_ids, self.embed_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map final hidden states [T, D] to next-token logits [T, V]."""
        return F.linear(self.norm(hidden), self.lm_head)

    @property
    def nbytes(self) -> int:
        tensors = [self.embed_tokens, *self.norm.parameters()]
        if self.lm_head.data_ptr() != self.embed_tokens.data_ptr():
            tensors.append(self.lm_head)
        return _nbytes(tensors)


class Expert:
    """Routed expert `index` of layer `layer`: a gated MLP applied to token vectors."""

    def __init__(self, layer: int, index: int, mlp: GatedMLP) -> None:
        self.layer = layer
        self.index = index
        self.mlp = mlp
        self.spec = f"expert[{layer}][{index}]"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map token vectors [N, D] to the expert's unweighted outputs [N, D]."""
        return self.mlp(hidden)

    forward = __call__

    @property
    def nbytes(self) -> int:
        return _nbytes(self.mlp.tensors())


@dataclass(frozen=True)
class MoeCall:
    """A block paused at an MoE layer, waiting for its routed experts' outputs."""

    layer: int
    hidden: torch.Tensor  # [T, D], the input of every routed expert
    routing: RoutingDecision  # expert_ids [T, K], weights [T, K]


@dataclass(frozen=True)
class BlockOutput:
    """The hidden states [T, D] after the block's last layer."""

    hidden: torch.Tensor


BlockStep = MoeCall | BlockOutput


@dataclass
class _Pending:
    position: int  # index into Block.layers of the paused MoE layer
    hidden: torch.Tensor  # [1, T, D], residual stream after attention
    shared: torch.Tensor | None  # [T, D], shared expert output, gated if the model gates it
    routing: RoutingDecision
    position_embeddings: Any
    masks: dict[int | None, torch.Tensor | None]


@dataclass
class _Session:
    cache: KVCache = field(default_factory=KVCache)
    length: int = 0  # tokens this block has processed for the session
    pending: _Pending | None = None


class Block:
    """Decoder layers `start` to `stop - 1`, with a KV cache per session."""

    def __init__(self, start: int, stop: int, layers: list[DecoderLayer], rotary: nn.Module) -> None:
        self.start = start
        self.stop = stop
        self.layers = layers
        self.rotary = rotary
        self.spec = f"block[{start}:{stop}]"
        self._sessions: dict[str, _Session] = {}

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.is_moe]

    @property
    def nbytes(self) -> int:
        return _nbytes([t for layer in self.layers for t in layer.tensors()])

    def session_length(self, session_id: str) -> int:
        """Return how many tokens of `session_id` this block has cached (0 for an unknown session)."""
        session = self._sessions.get(session_id)
        return session.length if session is not None else 0

    def session_cache_nbytes(self, session_id: str) -> int:
        session = self._sessions.get(session_id)
        return session.cache.nbytes() if session is not None else 0

    def close_session(self, session_id: str) -> None:
        """Drop the KV cache and any paused state of `session_id`."""
        self._sessions.pop(session_id, None)

    def forward_until_moe(self, session_id: str, hidden: torch.Tensor, position: int | None = None) -> BlockStep:
        """Run new tokens' hidden states [T, D] up to the first MoE layer or the block's end.

        `position`, if given, is the session position of the first new token. It
        must equal the number of tokens the block has already cached for the
        session, and 0 opens a new session.
        """
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
        if session.pending is not None:
            raise SessionError(
                f"session {session_id!r} on {self.spec} is waiting for the expert outputs of layer "
                f"{self.layers[session.pending.position].index}; call combine_and_continue first"
            )
        if position is not None and position != session.length:
            raise SessionError(
                f"session {session_id!r} on {self.spec} is at position {session.length}, not {position}; "
                "replay the session's earlier tokens or close it and start over"
            )
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ValueError(f"hidden states must be [T, D] with T >= 1, got shape {list(hidden.shape)}")
        new = hidden.shape[0]
        positions = torch.arange(session.length, session.length + new, device=hidden.device)[None, :]  # [1, T]
        position_embeddings = self.rotary(hidden, positions)
        masks: dict[int | None, torch.Tensor | None] = {}
        for layer in self.layers:
            if layer.window not in masks:
                masks[layer.window] = attention_mask(session.length, new, layer.window, hidden.device)
        return self._run(session, 0, hidden[None], position_embeddings, masks)

    def combine_and_continue(self, session_id: str, expert_outputs: torch.Tensor) -> BlockStep:
        """Combine the routed experts' outputs [T, K, D] of the paused layer and run on."""
        session = self._sessions.get(session_id)
        pending = session.pending if session is not None else None
        if session is None or pending is None:
            raise SessionError(
                f"session {session_id!r} on {self.spec} is not waiting for expert outputs; "
                "call forward_until_moe first"
            )
        expected = (*pending.routing.expert_ids.shape, pending.hidden.shape[-1])
        if tuple(expert_outputs.shape) != expected:
            raise ValueError(
                f"expert outputs for layer {self.layers[pending.position].index} must be [T, K, D] = "
                f"{list(expected)}, got {list(expert_outputs.shape)}"
            )
        session.pending = None

        weighted = expert_outputs * pending.routing.weights.unsqueeze(-1)  # [T, K, D]
        moe_output = weighted.sum(dim=1).to(pending.hidden.dtype)  # [T, D]
        if pending.shared is not None:
            moe_output = moe_output + pending.shared
        hidden = pending.hidden + moe_output  # [1, T, D]
        return self._run(session, pending.position + 1, hidden, pending.position_embeddings, pending.masks)

    def _run(
        self,
        session: _Session,
        first: int,
        hidden: torch.Tensor,
        position_embeddings: Any,
        masks: dict[int | None, torch.Tensor | None],
    ) -> BlockStep:
        for position in range(first, len(self.layers)):
            layer = self.layers[position]
            hidden = layer.attend(hidden, position_embeddings, masks[layer.window], session.cache)  # [1, T, D]
            if not layer.is_moe:
                hidden = layer.dense_mlp(hidden)
                continue
            assert layer.router is not None
            normed = layer.post_attention_layernorm(hidden)[0]  # [T, D]
            session.pending = _Pending(
                position=position,
                hidden=hidden,
                shared=layer.shared_output(normed),
                routing=layer.router(normed),
                position_embeddings=position_embeddings,
                masks=masks,
            )
            return MoeCall(layer=layer.index, hidden=normed, routing=session.pending.routing)
        session.length += hidden.shape[1]
        return BlockOutput(hidden[0])
