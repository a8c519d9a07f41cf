"""Device and dtype names from configuration and the command line."""

from __future__ import annotations

import pytest
import torch

from cortex.runtime.devices import resolve_device, resolve_dtype
from cortex.runtime.errors import UnsupportedModelError


def test_auto_picks_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_rejected() -> None:
    with pytest.raises(UnsupportedModelError, match=r"device 'cuda' requested but torch .* finds no CUDA GPU"):
        resolve_device("cuda")


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(UnsupportedModelError, match=r"unknown device 'tpu'; expected one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_dtype_names() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(UnsupportedModelError, match=r"unknown dtype 'float8'; expected one of float32, bfloat16, float16"):
        resolve_dtype("float8")
    with pytest.raises(UnsupportedModelError, match=r"dtype torch.int8 is not supported"):
        resolve_dtype(torch.int8)
