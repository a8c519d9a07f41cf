"""KV cache buffers, attention masks and the gated MLP.

Shape legend: H = heads, S = tokens in the session, T = new tokens, Dh = head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cortex.runtime.layers import GatedMLP, KVCache, attention_mask


def test_cache_returns_everything_so_far() -> None:
    cache = KVCache()
    keys = [torch.randn(1, 2, n, 8) for n in (5, 1, 70)]  # the third update outgrows the first buffer
    values = [torch.randn(1, 2, n, 4) for n in (5, 1, 70)]
    for key, value in zip(keys, values, strict=True):
        all_keys, all_values = cache.update(key, value, 3)
    assert all_keys.shape == (1, 2, 76, 8)
    assert all_values.shape == (1, 2, 76, 4)
    assert torch.equal(all_keys, torch.cat(keys, dim=2))
    assert torch.equal(all_values, torch.cat(values, dim=2))
    assert cache.length(3) == 76
    assert cache.length(0) == 0


def test_cache_layers_are_independent() -> None:
    cache = KVCache()
    cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2), 0)
    keys, _ = cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 1)
    assert keys.shape == (1, 1, 2, 2)
    assert cache.length(0) == 4
    assert cache.nbytes() > 0


def test_mask_not_needed_for_plain_causal_cases() -> None:
    assert attention_mask(past=0, new=9, window=None, device=torch.device("cpu")) is None
    assert attention_mask(past=9, new=1, window=None, device=torch.device("cpu")) is None
    assert attention_mask(past=3, new=1, window=8, device=torch.device("cpu")) is None


def test_mask_after_cached_prefix_is_causal() -> None:
    mask = attention_mask(past=3, new=2, window=None, device=torch.device("cpu"))
    assert mask is not None
    assert mask.shape == (1, 1, 2, 5)
    expected = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    assert torch.equal(mask[0, 0], expected)


def test_mask_applies_sliding_window() -> None:
    mask = attention_mask(past=4, new=1, window=3, device=torch.device("cpu"))
    assert mask is not None
    assert mask.shape == (1, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [False, False, True, True, True]  # the last 3 positions, itself included


def test_gated_mlp_matches_separate_projections() -> None:
    generator = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator),
                      torch.randn(8, 16, generator=generator))
    x = torch.randn(5, 8, generator=generator)
    mlp = GatedMLP(torch.cat([gate, up]), down, F.silu)
    out = mlp(x)
    assert out.shape == (5, 8)
    torch.testing.assert_close(out, F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))
