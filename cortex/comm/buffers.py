"""Receive buffers: tensors rebuilt from received chunks, large ones in reused memory.

A tensor that arrives in one chunk is a view of that ZeroMQ frame: no copy. A tensor of
several chunks is copied chunk by chunk into one contiguous buffer. Allocating a fresh
buffer for each large tensor costs a page fault per 4 KiB page on first write, so the pool
keeps a few buffers and hands one out again once no tensor uses it any more.

Reuse is safe because a pooled buffer is a `bytearray` wrapped through numpy. Numpy keeps a
buffer export on the bytearray for as long as any tensor or view made from it lives, and
a bytearray with an export cannot be resized. The pool probes that (pop one byte, push it
back) before it reuses a buffer, so a tensor a caller still holds is never overwritten.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np
import torch
import zmq

from cortex.comm.frames import DTYPES
from cortex.comm.records import TensorEntry

MAX_POOLED_BUFFERS = 8
MAX_POOLED_BYTES = 256 * 1024 * 1024


class BufferPool:
    """Reusable receive buffers, most recently used first, at most `max_buffers` and `max_bytes`.

    A buffer larger than `max_bytes` is handed out without being kept.
    """

    def __init__(self, max_buffers: int = MAX_POOLED_BUFFERS, max_bytes: int = MAX_POOLED_BYTES) -> None:
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._buffers: collections.deque[bytearray] = collections.deque()
        self.pooled_bytes = 0
        self.reused = 0
        self.allocated = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """Return a uint8 tensor of `nbytes` bytes backed by a free pooled buffer or a new one.

        A free buffer is reused if it is at least `nbytes` and at most twice that long.
        """
        for buffer in self._buffers:
            if nbytes <= len(buffer) <= 2 * nbytes and _is_free(buffer):
                self._buffers.remove(buffer)
                self._buffers.appendleft(buffer)
                self.reused += 1
                return torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, count=nbytes))
        buffer = bytearray(nbytes)
        self.allocated += 1
        if nbytes <= self.max_bytes:
            self._buffers.appendleft(buffer)
            self.pooled_bytes += nbytes
            while len(self._buffers) > self.max_buffers or self.pooled_bytes > self.max_bytes:
                self.pooled_bytes -= len(self._buffers.pop())
        return torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, count=nbytes))

    def __len__(self) -> int:
        return len(self._buffers)


def _is_free(buffer: bytearray) -> bool:
    """Return whether no tensor or memoryview exports `buffer` (resizing raises BufferError if one does)."""
    try:
        last = buffer.pop()
    except BufferError:
        return False
    buffer.append(last)
    return True


def assemble(dtype: str, shape: Sequence[int], chunks: Sequence[zmq.Frame], pool: BufferPool) -> torch.Tensor:
    """Rebuild a tensor from checked chunks: a view of a single chunk, else a copy into a pooled buffer."""
    torch_dtype = DTYPES[dtype]
    nbytes = sum(len(chunk) for chunk in chunks)
    if nbytes == 0 or math.prod(shape) == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    return _flat_bytes(chunks, nbytes, pool).view(torch_dtype).reshape(tuple(shape))


def assemble_entries(entries: Sequence[TensorEntry], chunks: Sequence[zmq.Frame], pool: BufferPool) -> list[torch.Tensor]:
    """Rebuild the tensors of one record from its checked chunks, where their bytes follow each other.

    Each tensor is a view of the received bytes (one chunk) or of one pooled copy (several).
    """
    nbytes = sum(len(chunk) for chunk in chunks)
    flat = _flat_bytes(chunks, nbytes, pool) if nbytes else None
    tensors = []
    offset = 0
    for entry in entries:
        torch_dtype = DTYPES[entry.dtype]
        if flat is None or entry.nbytes == 0:
            tensors.append(torch.empty(entry.shape, dtype=torch_dtype))
        else:
            tensors.append(flat[offset : offset + entry.nbytes].view(torch_dtype).reshape(entry.shape))
        offset += entry.nbytes
    return tensors


def _flat_bytes(chunks: Sequence[zmq.Frame], nbytes: int, pool: BufferPool) -> torch.Tensor:
    if len(chunks) == 1:
        return torch.frombuffer(chunks[0].buffer, dtype=torch.uint8)
    flat = pool.take(nbytes)
    target = flat.numpy()
    offset = 0
    for chunk in chunks:
        view = np.frombuffer(chunk.buffer, dtype=np.uint8)
        target[offset : offset + view.size] = view
        offset += view.size
    return flat
