"""What a newcomer operator hit after install: defaults, hints and error messages of the CLI."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.commands.init import _overrides_note
from cortex.commands.node import apply_log_levels
from cortex.commands.status import resolve_log_path
from cortex.node.config import ConfigError, load_config, parse_config
from cortex.node.config_checks import path_problems
from cortex.node.config_template import render_config
from cortex.node.hardware import Hardware
from cortex.node.home import describe_os_error, directory_problem, file_system_type
from cortex.node.lifecycle import NodeRefused, prepare_data_dir, wait_for_exit
from cortex.node.setup import SetupError, command_hints, set_up_home
from replay.errors import LogOpenError
from install_helpers import base_environment

CORTEX = str(Path(sys.prefix) / "bin" / "cortex")


def _write_home_config(home: Path, text: str = "data_dir: data\n") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text)
    return path


def _cortex(home: Path, *arguments: str, **extra: str) -> subprocess.CompletedProcess[str]:
    environment = base_environment(home, CORTEX_HOME=str(home / "cortex"), **extra)
    return subprocess.run([CORTEX, *arguments], capture_output=True, text=True, timeout=60, env=environment)


def _log_arguments() -> argparse.Namespace:
    return argparse.Namespace(log=None, data_dir=None)


def test_log_path_defaults_to_home_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_home_config(tmp_path / "home")
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CORTEX_DATA_DIR", raising=False)

    assert resolve_log_path(_log_arguments()) == tmp_path / "home" / "data" / "events.db"


def test_log_path_applies_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_home_config(tmp_path / "home")
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORTEX_DATA_DIR", str(tmp_path / "moved"))

    assert resolve_log_path(_log_arguments()) == tmp_path / "moved" / "events.db"


def test_log_path_without_home_config_names_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("CORTEX_DATA_DIR", raising=False)

    with pytest.raises(LogOpenError) as caught:
        resolve_log_path(_log_arguments())

    assert "cortex init" in str(caught.value)
    assert "--data-dir DIR" in str(caught.value)


@pytest.mark.parametrize("command", ["status", "tail"])
def test_status_and_tail_read_home_data_dir(tmp_path: Path, command: str) -> None:
    _write_home_config(tmp_path / "cortex")

    result = _cortex(tmp_path, command)

    assert result.returncode == 2
    assert f"{tmp_path / 'cortex' / 'data' / 'events.db'} does not exist" in result.stderr
    assert "no log given" not in result.stderr


def test_submit_without_bus_uses_home_config(tmp_path: Path) -> None:
    _write_home_config(tmp_path / "cortex")

    result = _cortex(tmp_path, "submit", "--model", "demo_model", "Hello", CORTEX_DATA_DIR=str(tmp_path / "moved"))

    assert result.returncode == 2
    assert "one of the arguments" not in result.stderr
    # The overridden data_dir is where submit looks for the running node's status file.
    assert f"{tmp_path / 'moved' / 'node.status.json'} is missing" in result.stderr


def test_submit_without_home_config_names_init(tmp_path: Path) -> None:
    result = _cortex(tmp_path, "submit", "--model", "demo_model", "Hello")

    assert result.returncode == 2
    assert "run `cortex init`" in result.stderr


def test_hints_give_venv_path_when_not_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")

    start, stop, activate = command_hints(tmp_path / "config.yaml")

    executable = shlex.split(start.split(": ", 1)[1])[0]
    assert executable == CORTEX
    assert os.access(executable, os.X_OK)
    assert stop.startswith(f"stop it: {CORTEX} node stop --config ")
    assert activate.endswith(f"source {Path(sys.prefix) / 'bin' / 'activate'}")


def test_hints_use_plain_cortex_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin")

    hints = command_hints(tmp_path / "config.yaml")

    assert hints == [
        f"start the node: cortex node start --config {tmp_path / 'config.yaml'}",
        f"stop it: cortex node stop --config {tmp_path / 'config.yaml'}",
    ]


def test_mistyped_identity_is_reported(tmp_path: Path) -> None:
    config = parse_config({"data_dir": "data", "identity": "typo/node.key", "fallback_model": "none"}, base_dir=tmp_path)

    problems = path_problems(config)

    assert len(problems) == 1
    assert problems[0].startswith(f"identity = '{tmp_path / 'typo' / 'node.key'}' is not found")
    assert "cortex init" in problems[0]
    assert not (tmp_path / "typo").exists()


def test_default_identity_may_be_missing(tmp_path: Path) -> None:
    explicit_default = parse_config({"data_dir": "data", "identity": "data/node.key", "fallback_model": "none"}, tmp_path)
    implicit_default = parse_config({"data_dir": "data", "fallback_model": "none"}, tmp_path)

    assert path_problems(explicit_default) == []
    assert path_problems(implicit_default) == []


def test_init_keeps_mistyped_identity_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORTEX_IDENTITY", raising=False)
    _write_home_config(tmp_path / "home", "data_dir: .\nidentity: keys/typo.key\n")

    with pytest.raises(SetupError) as caught:
        set_up_home(tmp_path / "home")

    assert caught.value.exit_status == 2
    assert "identity = " in str(caught.value)
    assert not (tmp_path / "home" / "keys").exists()


def test_kernel_file_system_gets_no_chown() -> None:
    if file_system_type(Path("/proc")) != "proc":
        pytest.skip("/proc is not a proc file system here")

    problem = directory_problem(Path("/proc/cortex-nope"))

    assert problem is not None
    assert "proc kernel file system" in problem
    assert "chown" not in problem


def test_refused_write_with_allowed_mode_gets_no_chown(tmp_path: Path) -> None:
    error = OSError(errno.EPERM, "Operation not permitted")

    message = describe_os_error(error, tmp_path / "config.yaml", tmp_path)

    assert "chown" not in message
    assert "read-only or special file system" in message


def test_uncreatable_data_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = parse_config({"data_dir": "file/data"}, base_dir=tmp_path)

    with pytest.raises(NodeRefused) as caught:
        prepare_data_dir(config)

    assert str(caught.value).startswith(f"data_dir = '{tmp_path / 'file' / 'data'}' could not be created")
    assert "\n" not in str(caught.value)


def test_second_node_does_not_open_log(tmp_path: Path) -> None:
    from cortex.node.node import Node

    config = parse_config({"data_dir": "data", "fallback_model": "none"}, base_dir=tmp_path)
    config.data_dir.mkdir()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        config.pid_path.write_text(f"{running.pid}\n")
        with pytest.raises(NodeRefused, match=f"pid {running.pid}"):
            Node(config)
    finally:
        running.kill()
        running.wait()

    assert not (config.data_dir / "events.db").exists()
    assert not config.identity_path.exists()


def test_node_without_models_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({"data_dir": "data"}, base_dir=tmp_path)

    with caplog.at_level(logging.WARNING, logger="cortex.node.lifecycle"):
        prepare_data_dir(config)

    assert any("`models`" in record.getMessage() for record in caplog.records)


def test_library_loggers_stay_at_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_home_config(tmp_path, "log_level: debug\n")
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    for name in ("libp2p", "multiaddr", "asyncio", "nats"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)

    apply_log_levels(load_config(path, environ={}))

    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("libp2p").level == logging.WARNING
    assert logging.getLogger("multiaddr").level == logging.WARNING
    assert logging.getLogger("nats").level == logging.WARNING
    apply_log_levels(load_config(path, environ={"CORTEX_LIBRARY_LOG_LEVEL": "DEBUG"}))
    assert logging.getLogger("libp2p").level == logging.DEBUG
    assert logging.getLogger("asyncio").level == logging.DEBUG


def test_environment_error_names_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_DEVICE", "gpu")

    with pytest.raises(SetupError) as caught:
        set_up_home(tmp_path / "home")

    message = str(caught.value)
    assert "correct or unset the environment variable CORTEX_DEVICE" in message
    assert "--force" not in message


def test_print_lists_overrides() -> None:
    note = _overrides_note({"CORTEX_DEVICE": "gpu", "CORTEX_HOME": "/x", "HOME": "/root"})

    assert "#   CORTEX_DEVICE=gpu" in note
    assert "CORTEX_HOME" not in note
    assert all(line.startswith("#") for line in note.strip().splitlines())
    assert _overrides_note({"HOME": "/root"}) == ""


def test_every_invalid_key_is_reported(tmp_path: Path) -> None:
    raw = {"torch_threads": 0, "device": "gpu", "bus": {"backend": "x", "bakend": "nats"}, "bogus": 1}

    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path, source="c.yaml")

    lines = str(caught.value).splitlines()
    assert len(lines) == 5
    assert "c.yaml: torch_threads = 0 is invalid; expected an integer >= 1" in lines
    assert "c.yaml: device = 'gpu' is invalid; expected one of auto, cpu, cuda" in lines
    assert "c.yaml: bus.backend = 'x' is invalid; expected one of libp2p, nats, memory" in lines
    assert any(line.startswith("c.yaml: unknown key bus.bakend;") for line in lines)
    assert any(line.startswith("c.yaml: unknown key bogus;") for line in lines)


@pytest.mark.parametrize("value", ["0", "9"])
def test_redundancy_message_gives_range(tmp_path: Path, value: str) -> None:
    path = _write_home_config(tmp_path, "data_dir: .\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"CORTEX_QUORUM_REDUNDANCY": value})

    assert f"quorum.redundancy = {value} (set by environment variable CORTEX_QUORUM_REDUNDANCY)" in str(caught.value)
    assert "expected an integer from 1 to 8" in str(caught.value)
    assert caught.value.variables == ("CORTEX_QUORUM_REDUNDANCY",)


@pytest.mark.parametrize(("ram_mb", "kv_cache_mb"), [(1024, 256), (3000, 256), (10_000, 1024), (16_384, 2048)])
def test_kv_cache_budget_rounds_down(ram_mb: int, kv_cache_mb: int) -> None:
    hardware = Hardware(
        cpu_cores=2, cpu_model="test", machine="x86_64", ram_mb=ram_mb, disk_free_mb=10_000, gpus=(), gpu_source="none",
        torch_cuda=False,
    )

    assert f"\nkv_cache_budget_mb: {kv_cache_mb}\n" in render_config(hardware)


def test_package_path_is_reported_as_written(tmp_path: Path) -> None:
    config = parse_config({"data_dir": "data", "models": [{"path": "package:no_such_model"}]}, base_dir=tmp_path)

    problems = path_problems(config)

    assert problems == ["models[0].path = 'package:no_such_model' is unreachable: expected an existing checkpoint folder"]


def test_yaml_error_names_file(tmp_path: Path) -> None:
    path = _write_home_config(tmp_path, "models: [\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert f'in "{path}", line 2' in str(caught.value)
    assert "<unicode string>" not in str(caught.value)


def test_wait_for_exit_sees_exited_child(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # The child stays a zombie until waited for, which counts as exited.
        assert wait_for_exit(tmp_path, child.pid, timeout_s=20.0)
    finally:
        child.wait()


def test_wait_for_exit_times_out(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not wait_for_exit(tmp_path, child.pid, timeout_s=0.3)
    finally:
        child.kill()
        child.wait()


def test_second_stop_says_not_running(tmp_path: Path) -> None:
    result = _cortex(tmp_path, "node", "stop", "--data-dir", str(tmp_path))

    assert result.returncode == 1
    assert "no running node found" in result.stderr
