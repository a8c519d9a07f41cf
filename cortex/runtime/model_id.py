"""Model ids: a digest that distinguishes checkpoints without reading their weights.

`model_id(dir)` is the SHA-256 (hex) of:

- a format tag, `cortex-model-id/1`;
- `config.json` as canonical JSON (sorted keys, no whitespace), without the
  informational `transformers_version` and `_name_or_path` keys, so a re-save
  by another transformers version keeps the id;
- the tensor index: for every tensor, sorted by name, its name, safetensors
  dtype and shape, read from the shard headers (a few KB per shard).

NOTE: tensor values are not hashed, so two checkpoints with the same config
and tensor shapes but different weights (two fine-tunes of one base) share an
id. Hashing every tensor would read the whole checkpoint, hundreds of GB for
DeepSeek-V3, on every node.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cortex.runtime.checkpoint import Checkpoint

FORMAT_TAG = b"cortex-model-id/1"
_INFORMATIONAL_KEYS = frozenset({"transformers_version", "_name_or_path"})


def model_id(checkpoint_dir: str | Path | Checkpoint) -> str:
    """Return the 64-hex-digit id of the checkpoint in `checkpoint_dir`."""
    checkpoint = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else Checkpoint(checkpoint_dir)
    config = {key: value for key, value in checkpoint.config.items() if key not in _INFORMATIONAL_KEYS}
    index = []
    for name in sorted(checkpoint.weight_map):
        info = checkpoint.info(name)
        index.append([name, info.dtype, list(info.shape)])
    digest = hashlib.sha256()
    digest.update(FORMAT_TAG + b"\n")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    digest.update(json.dumps(index, separators=(",", ":")).encode())
    return digest.hexdigest()
