"""The Dockerfile and docker-compose.yml name only files and commands that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cortex.cli import build_parser

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


def test_compose_services_build_from_dockerfile() -> None:
    services = _compose()["services"]
    assert set(services) == {"node", "demo"}
    for name, service in services.items():
        assert service["build"] == ".", name
        assert (ROOT / "Dockerfile").is_file()


def test_compose_commands_are_cortex_subcommands() -> None:
    subcommands = _subcommands()
    for name, service in _compose()["services"].items():
        assert service["command"][0] in subcommands, name


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
