"""Device and dtype names as they appear in configuration and on the command line."""

from __future__ import annotations

import torch

from cortex.runtime.errors import UnsupportedModelError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a torch device.

    `auto` picks CUDA when torch finds a GPU and the CPU otherwise.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        # NOTE: the CUDA path runs the same code as the CPU path but has not been
        # tested on a GPU; only the CPU path is covered by the test suite.
        if not torch.cuda.is_available():
            raise UnsupportedModelError(
                f"device {name!r} requested but torch {torch.__version__} finds no CUDA GPU; "
                "use device 'cpu' or 'auto'"
            )
        return torch.device(name)
    raise UnsupportedModelError(f"unknown device {name!r}; expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def resolve_dtype(name: str | torch.dtype = "float32") -> torch.dtype:
    """Turn `float32`, `bfloat16` or `float16` into a torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UnsupportedModelError(f"dtype {name} is not supported; expected one of {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None
