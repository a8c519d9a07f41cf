"""install.sh starting the node: docker compose, a Docker that rejects the user, native start and stop, --demo."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from install_helpers import ROOT, VENV, base_environment, path_with, process_alive, run_install, write_tool

NO_ENGINE = (
    'if [ "$1" = info ]; then echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. '
    'Is the docker daemon running?" >&2; exit 1; fi; exit 1'
)
STOP_WAIT_S = 60.0


def test_install_starts_compose_when_docker_answers(tmp_path: Path) -> None:
    calls = tmp_path / "docker-calls"
    # A docker whose engine answers: `info` succeeds, and every compose call is recorded with its environment.
    body = (
        'if [ "$1" = info ]; then exit 0; fi\n'
        'if [ "$1 $2" = "compose version" ]; then echo "Docker Compose version v2.30.0"; exit 0; fi\n'
        f'echo "$* | CORTEX_HOME=$CORTEX_HOME CORTEX_UID=$CORTEX_UID CORTEX_GID=$CORTEX_GID" >> {calls}'
    )
    tools = tmp_path / "tools"
    write_tool(tools, "docker", body)
    environment = base_environment(tmp_path, PATH=path_with(tools))

    result = run_install(tmp_path, environment=environment)

    assert result.returncode == 0, result.stderr
    recorded = calls.read_text().splitlines()
    assert recorded == [
        f"compose -f {ROOT / 'docker-compose.yml'} up -d --build node | CORTEX_HOME={tmp_path / '.cortex'} "
        f"CORTEX_UID={os.getuid()} CORTEX_GID={os.getgid()}"
    ]
    assert "Starting the node with docker compose" in result.stdout
    assert not (tmp_path / ".cortex" / "node.pid").exists()


def test_install_docker_rejecting_user_names_fix(tmp_path: Path) -> None:
    body = (
        'if [ "$1" = info ]; then echo "permission denied while trying to connect to the Docker daemon socket at '
        'unix:///var/run/docker.sock: dial unix /var/run/docker.sock: connect: permission denied" >&2; exit 1; fi; exit 1'
    )
    tools = tmp_path / "tools"
    write_tool(tools, "docker", body)
    environment = base_environment(tmp_path, PATH=path_with(tools))

    result = run_install(tmp_path, environment=environment)

    assert result.returncode == 3
    assert "Docker rejected this user" in result.stderr
    assert "sudo usermod -aG docker" in result.stderr
    assert "cortex node start --config" in result.stderr
    assert not (tmp_path / ".cortex" / "node.pid").exists()


def test_install_demo_runs_demo_not_node(tmp_path: Path) -> None:
    # A venv whose cortex records `demo` and passes every other command to the real one.
    venv = tmp_path / "venv"
    marker = tmp_path / "demo-ran"
    write_tool(venv / "bin", "python", f'exec {VENV / "bin" / "python"} "$@"')
    write_tool(
        venv / "bin", "cortex",
        f'if [ "$1" = demo ]; then echo "$*" > {marker}; exit 0; fi; exec {VENV / "bin" / "cortex"} "$@"',
    )
    tools = tmp_path / "tools"
    write_tool(tools, "docker", NO_ENGINE)
    command = ["bash", str(ROOT / "install.sh"), "--venv", str(venv), "--demo"]
    environment = base_environment(tmp_path, PATH=path_with(tools))

    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)

    assert result.returncode == 0, result.stderr
    assert marker.read_text().strip() == "demo"
    assert (tmp_path / ".cortex" / "config.yaml").is_file()
    assert not (tmp_path / ".cortex" / "node.pid").exists()


@pytest.mark.slow
def test_install_native_start_then_node_stop(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    write_tool(tools, "docker", NO_ENGINE)
    # The override reaches the node: it serves the head and blocks only, not the whole model.
    environment = base_environment(tmp_path, PATH=path_with(tools), CORTEX_MODELS_0_FRAGMENTS="head, block[0:4]")
    home = tmp_path / ".cortex"
    pid = None
    try:
        result = run_install(tmp_path, environment=environment)
        if (home / "node.pid").exists():
            pid = int((home / "node.pid").read_text())

        assert result.returncode == 0, result.stdout + result.stderr
        assert "No Docker engine answers" in result.stdout
        assert "The node serves" in result.stdout
        assert pid is not None and process_alive(pid)
        status = orjson.loads((home / "node.status.json").read_bytes())
        assert status["state"] == "serving"
        assert status["pid"] == pid
        assert all("/ip4/127.0.0.1/" in address for address in status["bus_addresses"])
        assert list(status["models"].values()) == [["head", "block[0:4]"]]
        assert (home / "node.log").stat().st_size > 0

        again = run_install(tmp_path, environment=environment)
        assert again.returncode == 0, again.stderr
        assert f"A node already runs from {home} (pid {pid})" in again.stdout

        stop = subprocess.run(
            [str(VENV / "bin" / "cortex"), "node", "stop"], capture_output=True, text=True, env=environment, timeout=60
        )
        assert stop.returncode == 0, stop.stderr
        assert f"sent SIGTERM to node pid {pid}" in stop.stdout
        deadline = time.monotonic() + STOP_WAIT_S
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(pid)
        assert not (home / "node.pid").exists()
    finally:
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)
