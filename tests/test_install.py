"""install.sh: missing build prerequisites stop it early with the package to install; its help and the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_install(tmp_path: Path, tools: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run install.sh with a PATH holding only the given tools (name -> script body or target)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "sed", "dirname", "printf"):
        target = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()
        if target.startswith("/"):
            (bin_dir / name).symlink_to(target)
    for name, body in tools.items():
        path = bin_dir / name
        if body.startswith("/"):
            path.symlink_to(body)
        else:
            path.write_text("#!/bin/sh\n" + body + "\n")
            path.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(
        ["bash", str(ROOT / "install.sh"), "--venv", str(tmp_path / "venv")],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_install_without_compiler_names_package(tmp_path: Path) -> None:
    result = _run_install(tmp_path, {"python3": sys.executable})
    assert result.returncode == 1
    assert "a C compiler" in result.stderr
    assert "build-essential" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_install_without_gmp_names_package(tmp_path: Path) -> None:
    # A compiler that cannot link against GMP stands in for a machine without libgmp-dev.
    result = _run_install(tmp_path, {"python3": sys.executable, "cc": "exit 1"})
    assert result.returncode == 1
    assert "libgmp-dev" in result.stderr
    assert "a C compiler" not in result.stderr


def test_install_with_old_python_names_version(tmp_path: Path) -> None:
    old_python = 'if [ "$1" = "--version" ]; then echo "Python 3.9.2"; else exit 1; fi'
    result = _run_install(tmp_path, {"python3": old_python, "cc": "/usr/bin/cc"})
    assert result.returncode == 1
    assert "Python 3.11 or newer (found: Python 3.9.2)" in result.stderr


def test_install_rejects_unknown_option() -> None:
    result = subprocess.run(["bash", str(ROOT / "install.sh"), "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown option '--frobnicate'" in result.stderr


@pytest.mark.skipif(not os.path.exists("/usr/include/gmp.h") and not os.path.exists("/usr/include/x86_64-linux-gnu/gmp.h"), reason="GMP headers are not installed here")
def test_install_prerequisites_pass_here(tmp_path: Path) -> None:
    # With the real compiler and headers, the checks pass and only the (stubbed) venv step runs.
    fake_python = f'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then exit 7; fi; exec {sys.executable} "$@"'
    tools = {"python3": fake_python, "cc": "/usr/bin/cc"}
    for name in ("as", "ld"):  # The compiler finds its assembler and linker on PATH.
        tools[name] = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()
    result = _run_install(tmp_path, tools)
    assert "missing build prerequisites" not in result.stderr
    assert result.returncode == 7


def _shell_blocks(markdown: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL)]


def test_readme_commands_in_step_with_ci() -> None:
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for readme in ("README.md", "README.fr.md"):
        blocks = _shell_blocks((ROOT / readme).read_text(encoding="utf-8"))
        assert blocks[:2] == ["./install.sh --demo", "./install.sh --dev --no-start && .venv/bin/pytest -q -ra"], readme
        assert blocks[1] in ci_script.splitlines(), readme


def test_install_help_lists_every_option() -> None:
    result = subprocess.run(["bash", str(ROOT / "install.sh"), "--help"], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0
    for option in ("--demo", "--no-start", "--dev", "--venv DIR"):
        assert option in result.stdout, option
    assert "#" not in result.stdout
    assert "set -euo" not in result.stdout
