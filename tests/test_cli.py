"""The `cortex` command line: every subcommand prints its --help, and help stays light."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cortex.cli import build_parser, main


def _subcommand_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                path = prefix + (name,)
                paths.append(path)
                paths.extend(_subcommand_paths(subparser, path))
    return paths


def test_cli_lists_bench_command() -> None:
    paths = _subcommand_paths(build_parser())
    assert ("bench",) in paths


@pytest.mark.parametrize("path", _subcommand_paths(build_parser()), ids=" ".join)
def test_cli_subcommand_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cortex " + " ".join(path))
    assert len(out.splitlines()) >= 3


def test_cli_help_imports_no_torch() -> None:
    # `cortex --help` must stay fast: subcommands import heavy modules only when they run.
    code = "import sys; from cortex.cli import build_parser; build_parser(); print('torch' in sys.modules, 'libp2p' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "usage: cortex" in capsys.readouterr().out
