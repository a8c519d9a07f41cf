"""Request-scoped records: signed proof of which peer computed which expert outputs.

An expert holder signs one `ExpertBatchServed` per batch it answers and sends its wire
bytes back with the outputs. The caller checks the digest against the bytes it received
and appends the record to its own log, so `store.events(type="ExpertBatchServed")` on the
block holder shows, for every MoE layer of every session, the peer that produced the
outputs. Records are not gossiped: they reach other peers only through anti-entropy.

NOTE: the data plane (`cortex.comm`) is meant to carry such records with every tensor
message; this type covers expert outputs until it does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from events.model import event_type

RECORDS = "records"


def tensor_digest(tensor: torch.Tensor) -> str:
    """Return the BLAKE2b-256 hex digest of a tensor's raw bytes (C-contiguous)."""
    contiguous = tensor.detach().contiguous().cpu()
    return hashlib.blake2b(contiguous.view(torch.uint8).numpy().tobytes(), digest_size=32).hexdigest()


@event_type(version="1.0", family=RECORDS)
@dataclass(frozen=True, slots=True)
class ExpertBatchServed:
    """The author ran `segments` ("layer:expert:rows" each, in row order) for `sessions`.

    `output_digest` is `tensor_digest` of the outputs [N, D] it returned, `dtype` their dtype.
    """

    model_id: str
    sessions: tuple[str, ...]
    segments: tuple[str, ...]
    output_digest: str
    dtype: str

    def __post_init__(self) -> None:
        if len(self.output_digest) != 64:
            raise ValueError(f"output_digest must be 64 hex digits, got {len(self.output_digest)} characters")
