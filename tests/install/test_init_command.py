"""`cortex init` and the node commands' default config, run in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.cli import main
from cortex.node.config import load_config
from install_helpers import snapshot


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CORTEX_HOME", raising=False)
    return tmp_path / ".cortex"


def test_init_print_writes_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--print"]) == 0

    printed = capsys.readouterr().out
    assert printed.startswith("# Cortex node config, written by `cortex init`")
    assert "fallback_model: package:demo_model" in printed
    assert not home.exists()


def test_init_print_matches_written_config(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--print"]) == 0
    printed = capsys.readouterr().out

    assert main(["init"]) == 0

    assert (home / "config.yaml").read_text() == printed


def test_init_home_option_overrides_environment(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "from-env"))

    assert main(["init", "--home", str(tmp_path / "chosen")]) == 0

    assert (tmp_path / "chosen" / "config.yaml").is_file()
    assert not (tmp_path / "from-env").exists()


def test_init_rerun_after_force_changes_nothing(home: Path) -> None:
    home.mkdir()
    (home / "config.yaml").write_text("log_level: WARNING\n")
    assert main(["init", "--force"]) == 0
    before = snapshot(home)

    assert main(["init"]) == 0
    assert main(["init", "--force"]) == 0

    assert snapshot(home) == before
    assert (home / "config.yaml.old").read_text() == "log_level: WARNING\n"


def test_init_rejects_group_readable_key(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home.mkdir()
    key = home / "node.key"
    key.write_bytes(b"\x01" * 32)
    key.chmod(0o644)

    assert main(["init"]) == 2

    error = capsys.readouterr().err
    assert f"run `chmod 600 {key}`" in error
    assert key.read_bytes() == b"\x01" * 32


def test_init_config_loads_with_overrides(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["init"]) == 0

    config = load_config(home / "config.yaml", {"CORTEX_BUS_BACKEND": "nats", "CORTEX_API_LISTEN": "127.0.0.1:0"})

    assert config.bus.backend == "nats"
    assert config.api.listen == "127.0.0.1:0"
    assert config.data_dir == home


@pytest.mark.parametrize("command", [["node", "start"], ["node", "stop"]])
def test_node_command_without_config_names_init(home: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(command) == 2

    assert f"{home / 'config.yaml'} does not exist; run `cortex init`" in capsys.readouterr().err


def test_node_stop_default_config_without_node(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init"]) == 0

    assert main(["node", "stop"]) == 1

    assert f"no running node found for data directory {home}" in capsys.readouterr().err
