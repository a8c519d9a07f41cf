"""Model ids: a digest of a checkpoint's config and tensor index, covering the weights when it can.

`model_id(dir)` is the SHA-256 (hex) of:

- a format tag: `cortex-model-id/2` with a manifest, `cortex-model-id/1` without;
- `config.json` as canonical JSON (sorted keys, no whitespace), without the
  informational `transformers_version` and `_name_or_path` keys, so a re-save
  by another transformers version keeps the id;
- the tensor index, sorted by name. With a tensor manifest
  (`cortex-manifest.json`, see `cortex.runtime.manifest`) it is every tensor's
  name, dtype, shape, SHA-256 and row-block SHA-256s from the manifest, so
  checkpoints with different weights get different ids. Without one it is
  every tensor's name, dtype and shape from the shard headers.

Computing the id reads the shard headers (a few KB per shard) and the manifest,
never the tensors. The manifest must list exactly the tensors of the headers,
with their dtypes and shapes, or a `ManifestError` names the tensor that differs.
The id trusts the manifest's digests, and the Loader checks them: every tensor
a node loads is verified against the manifest as it is read. So a node whose
shards differ from the manifest fails on the first differing tensor it loads
instead of serving other weights under the id. Tensors a node does not load
are never read.

NOTE: without a manifest, tensor values are not hashed, so two checkpoints with
the same config and tensor shapes but different weights (two fine-tunes of one
base) share an id. The publisher of a model runs `cortex model manifest DIR`
once and ships the manifest with the weights to avoid that. A folder with a
manifest and a copy without one get different ids, so they never mix either.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cortex.runtime.checkpoint import Checkpoint
from cortex.runtime.manifest import MANIFEST_FILE, check_against_headers

logger = logging.getLogger(__name__)

FORMAT_TAG = b"cortex-model-id/1"
WEIGHTS_FORMAT_TAG = b"cortex-model-id/2"
_INFORMATIONAL_KEYS = frozenset({"transformers_version", "_name_or_path"})


def model_id(checkpoint_dir: str | Path | Checkpoint) -> str:
    """Return the 64-hex-digit id of the checkpoint in `checkpoint_dir`."""
    checkpoint = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else Checkpoint(checkpoint_dir)
    config = {key: value for key, value in checkpoint.config.items() if key not in _INFORMATIONAL_KEYS}
    manifest = checkpoint.manifest
    index: list[list[Any]]
    if manifest is not None:
        check_against_headers(manifest, checkpoint)
        tag, index = WEIGHTS_FORMAT_TAG, manifest.canonical_index()
    else:
        logger.info(
            "%s has no %s, so its model id covers tensor names, dtypes and shapes but not values",
            checkpoint.path,
            MANIFEST_FILE,
        )
        tag, index = FORMAT_TAG, []
        for name in sorted(checkpoint.weight_map):
            info = checkpoint.info(name)
            index.append([name, info.dtype, list(info.shape)])
    digest = hashlib.sha256()
    digest.update(tag + b"\n")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    digest.update(json.dumps(index, separators=(",", ":")).encode())
    return digest.hexdigest()


def covers_weights(checkpoint_dir: str | Path | Checkpoint) -> bool:
    """Return whether the id of the checkpoint covers tensor values (the folder has a manifest)."""
    checkpoint = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else Checkpoint(checkpoint_dir)
    return checkpoint.manifest is not None
