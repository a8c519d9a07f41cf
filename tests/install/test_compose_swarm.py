"""The swarm profile of docker-compose.yml, run natively: its commands and environment make a working swarm.

No Docker engine runs here, so each swarm service's entrypoint, command and environment are
read from docker-compose.yml and run as local processes, with the `/swarm` volume mapped to a
temporary folder and the NATS port 4333 mapped to a free port. The experts start once the head
node serves, as the compose file's healthcheck condition orders.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from install_helpers import ROOT, VENV, base_environment, process_alive

NATS_PORT = "4333"
SERVE_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 40.0
EXPERT_FRAGMENTS = {f"expert[{layer}][{index}]" for layer in (1, 2, 3) for index in range(16)}


def _swarm_services() -> dict[str, dict]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    return {name: service for name, service in services.items() if "swarm" in service.get("profiles", [])}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _local(text: str, swarm_dir: Path, port: int) -> str:
    """Map the container's /swarm volume and NATS port to this machine's."""
    return text.replace("/swarm", str(swarm_dir)).replace(f":{NATS_PORT}", f":{port}").replace(NATS_PORT, str(port))


def _status(home: Path) -> dict | None:
    try:
        return orjson.loads((home / "node.status.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _wait_serving(home: Path, process: subprocess.Popen[bytes]) -> dict:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _status(home)
        if status is not None and status.get("state") == "serving":
            return status
        assert process.poll() is None, f"{home.name} exited with {process.returncode}: {(home / 'out.log').read_text()[-2000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{home.name} does not serve after {SERVE_TIMEOUT_S} s")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_swarm_profile_serves_a_prompt(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    services = _swarm_services()
    assert list(services) == ["swarm-nats", "swarm-head", "swarm-experts-1", "swarm-experts-2"]
    swarm_dir = tmp_path / "swarm"
    swarm_dir.mkdir()
    port = _free_port()
    environment = base_environment(tmp_path, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}")

    nats = services["swarm-nats"]
    nats_command = [_local(part, swarm_dir, port) for part in nats["entrypoint"] + nats["command"]]
    processes.append(subprocess.Popen(nats_command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    homes: dict[str, Path] = {}
    for name in ("swarm-head", "swarm-experts-1", "swarm-experts-2"):
        service = services[name]
        variables = {key: _local(str(value), swarm_dir, port) for key, value in service["environment"].items()}
        home = Path(variables["CORTEX_HOME"])
        home.mkdir(parents=True)
        homes[name] = home
        with open(home / "out.log", "wb") as output:
            processes.append(
                subprocess.Popen(service["entrypoint"], env={**environment, **variables}, stdout=output, stderr=subprocess.STDOUT)
            )
        if name == "swarm-head":
            assert service["healthcheck"]["test"][-1] == "/swarm/head/node.status.json"
            head_status = _wait_serving(home, processes[-1])
    expert_statuses = [_wait_serving(homes[name], processes[index]) for index, name in ((2, "swarm-experts-1"), (3, "swarm-experts-2"))]

    assert list(head_status["models"].values()) == [["head", "block[0:4]"]]
    for status in expert_statuses:
        assert set(next(iter(status["models"].values()))) == EXPERT_FRAGMENTS
    submit = subprocess.run(
        [str(VENV / "bin" / "cortex"), "submit", "--nats-url", f"nats://127.0.0.1:{port}", "--model", "demo_model",
         "--max-tokens", "4", "--json", "The swarm"],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert submit.returncode == 0, submit.stderr
    result = orjson.loads(submit.stdout.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 4
    assert result["completed"]["degraded"] is False
    assert result["driver"] == head_status["peer_id"]

    for name in ("swarm-experts-2", "swarm-experts-1", "swarm-head"):
        stop = subprocess.run(
            [str(VENV / "bin" / "cortex"), "node", "stop", "--config", str(homes[name] / "config.yaml")],
            capture_output=True, text=True, env=environment, timeout=60,
        )
        assert stop.returncode == 0, stop.stderr
    for process in processes[1:]:
        process.wait(STOP_TIMEOUT_S)
        assert not process_alive(process.pid)
