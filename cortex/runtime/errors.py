"""Errors of the model runtime.

Every message names the file, tensor or value at fault and the fix.
`ModelRuntimeError` is the base, so a caller can catch the whole subsystem.
"""

from __future__ import annotations


class ModelRuntimeError(Exception):
    """Base class of every error raised by `cortex.runtime`."""


class CheckpointError(ModelRuntimeError):
    """A checkpoint folder with a missing file or an unreadable index."""


class MissingTensorError(CheckpointError):
    """A tensor that a fragment needs is not in the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape on disk differs from the shape that config.json implies."""


class ManifestError(CheckpointError):
    """A tensor manifest (`cortex-manifest.json`) that is unreadable or disagrees with the shard headers."""


class DigestMismatchError(CheckpointError):
    """A tensor whose stored bytes do not match its digest in the checkpoint's manifest."""


class UnsupportedModelError(ModelRuntimeError):
    """An architecture, tensor dtype or quantization method that Cortex cannot run."""


class FragmentSpecError(ModelRuntimeError, ValueError):
    """A fragment spec string that does not parse or does not fit the model."""


class SessionError(ModelRuntimeError):
    """A block call that does not fit the state of its session."""
