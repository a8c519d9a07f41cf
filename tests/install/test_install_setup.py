"""install.sh --no-start in a temporary HOME: first and second run, kept identity, kept config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cortex.node.config import load_config
from events import Identity
from install_helpers import VENV, base_environment, run_install, snapshot


def test_install_first_run_sets_up_home(tmp_path: Path) -> None:
    result = run_install(tmp_path, "--no-start")

    assert result.returncode == 0, result.stderr
    home = tmp_path / ".cortex"
    assert (home / "config.yaml").is_file()
    assert (home / "node.key").stat().st_mode & 0o777 == 0o600
    assert "skipping pip" in result.stdout
    assert f"wrote {home / 'config.yaml'}" in result.stdout
    peer_id = Identity.load(home / "node.key").peer_id
    assert f"peer id: {peer_id}" in result.stdout
    assert "Set up without starting a node" in result.stdout
    assert not (home / "node.pid").exists()
    config = load_config(home / "config.yaml")
    assert config.data_dir == home
    assert config.identity_path == home / "node.key"


@pytest.mark.slow
def test_install_second_run_changes_nothing(tmp_path: Path) -> None:
    first = run_install(tmp_path, "--no-start")
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path)

    second = run_install(tmp_path, "--no-start")

    assert second.returncode == 0, second.stderr
    assert snapshot(tmp_path) == before
    assert "(it matches this machine)" in second.stdout
    assert "kept the existing node key" in second.stdout


def test_install_keeps_existing_identity(tmp_path: Path) -> None:
    key_path = tmp_path / ".cortex" / "node.key"
    identity = Identity.load_or_create(key_path)
    key_bytes = key_path.read_bytes()

    result = run_install(tmp_path, "--no-start")

    assert result.returncode == 0, result.stderr
    assert key_path.read_bytes() == key_bytes
    assert f"peer id: {identity.peer_id}" in result.stdout
    assert "kept the existing node key" in result.stdout


@pytest.mark.slow
def test_install_keeps_existing_config(tmp_path: Path) -> None:
    home = tmp_path / ".cortex"
    home.mkdir()
    own_config = "# my node\ndata_dir: ./state\nlog_level: DEBUG\nmodels: []\n"
    (home / "config.yaml").write_text(own_config)

    result = run_install(tmp_path, "--no-start")

    assert result.returncode == 0, result.stderr
    assert (home / "config.yaml").read_text() == own_config
    generated = (home / "config.yaml.new").read_text()
    assert "written by `cortex init`" in generated
    assert f"kept your {home / 'config.yaml'}" in result.stdout
    assert str(home / "config.yaml.new") in result.stdout
    # The key goes where the kept config puts it.
    assert (home / "state" / "node.key").is_file()
    before = snapshot(tmp_path)

    again = run_install(tmp_path, "--no-start")

    assert again.returncode == 0, again.stderr
    assert snapshot(tmp_path) == before


def test_init_force_replaces_config_keeps_old(tmp_path: Path) -> None:
    home = tmp_path / ".cortex"
    home.mkdir()
    own_config = "log_level: DEBUG\n"
    (home / "config.yaml").write_text(own_config)
    environment = base_environment(tmp_path)

    result = subprocess.run(
        [str(VENV / "bin" / "cortex"), "init", "--force"],
        capture_output=True, text=True, env=environment, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert (home / "config.yaml.old").read_text() == own_config
    assert "written by `cortex init`" in (home / "config.yaml").read_text()
    assert "replaced" in result.stdout


def test_install_invalid_config_names_key(tmp_path: Path) -> None:
    home = tmp_path / ".cortex"
    home.mkdir()
    (home / "config.yaml").write_text("bus:\n  backend: kafka\n")

    result = run_install(tmp_path, "--no-start")

    assert result.returncode == 2
    assert "bus.backend = 'kafka' is invalid; expected one of libp2p, nats, memory" in result.stderr
    assert "cortex init --force" in result.stderr


def test_install_bad_override_names_variable(tmp_path: Path) -> None:
    environment = base_environment(tmp_path, CORTEX_LOG_LEVEL="loud")

    result = run_install(tmp_path, "--no-start", environment=environment)

    assert result.returncode == 2
    assert "log_level = 'loud' (set by environment variable CORTEX_LOG_LEVEL) is invalid" in result.stderr


def test_install_respects_cortex_home(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere" / "cortex"
    environment = base_environment(tmp_path / "user", CORTEX_HOME=str(home))

    result = run_install(tmp_path / "user", "--no-start", environment=environment)

    assert result.returncode == 0, result.stderr
    assert (home / "config.yaml").is_file()
    assert not (tmp_path / "user" / ".cortex").exists()
    generated = yaml.safe_load((home / "config.yaml").read_text())
    assert generated["data_dir"] == "."
