"""Fragment spec strings: parsing, printing and model checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.runtime.errors import FragmentSpecError
from cortex.runtime.spec import BlockSpec, ExpertSpec, HeadSpec, check_fragment_spec, parse_fragment_spec


def test_parse_known_specs() -> None:
    assert parse_fragment_spec("head") == HeadSpec()
    assert parse_fragment_spec("block[0:2]") == BlockSpec(0, 2)
    assert parse_fragment_spec(" expert[3][17] ") == ExpertSpec(3, 17)


@given(st.integers(0, 10_000), st.integers(1, 10_000))
def test_block_spec_round_trips(start: int, length: int) -> None:
    spec = BlockSpec(start, start + length)
    assert parse_fragment_spec(str(spec)) == spec


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_expert_spec_round_trips(layer: int, expert: int) -> None:
    spec = ExpertSpec(layer, expert)
    assert parse_fragment_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text", ["", "Head", "block[0-2]", "block[:2]", "block[0:2", "expert[1]", "expert[1][2][3]", "expert[-1][2]", "blocks[0:1]"]
)
def test_invalid_spec_names_syntax(text: str) -> None:
    with pytest.raises(FragmentSpecError, match=r"invalid fragment spec .* expected 'head', 'block\[a:b\]'"):
        parse_fragment_spec(text)


def test_empty_block_is_rejected() -> None:
    with pytest.raises(FragmentSpecError, match=r"'block\[3:3\]' is an empty block: layers 3 to 2; write block\[a:b\] with a < b"):
        parse_fragment_spec("block[3:3]")


def test_check_against_model() -> None:
    def is_moe(layer: int) -> bool:
        return layer >= 1

    check_fragment_spec(BlockSpec(0, 4), 4, is_moe, 8)
    check_fragment_spec(ExpertSpec(3, 7), 4, is_moe, 8)
    with pytest.raises(FragmentSpecError, match=r"block\[1:5\] ends after the last layer: the model has 4 layers"):
        check_fragment_spec(BlockSpec(1, 5), 4, is_moe, 8)
    with pytest.raises(FragmentSpecError, match=r"names layer 4, but the model has 4 layers \(0 to 3\)"):
        check_fragment_spec(ExpertSpec(4, 0), 4, is_moe, 8)
    with pytest.raises(FragmentSpecError, match=r"dense layer without routed experts; MoE layers of this model: \[1, 2, 3\]"):
        check_fragment_spec(ExpertSpec(0, 0), 4, is_moe, 8)
    with pytest.raises(FragmentSpecError, match=r"names expert 8, but each MoE layer has 8 experts \(0 to 7\)"):
        check_fragment_spec(ExpertSpec(1, 8), 4, is_moe, 8)
