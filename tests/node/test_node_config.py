"""Node config: defaults, validation messages, round trip through YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.node.config import ConfigError, load_config, parse_config, config_to_yaml


def test_config_defaults(tmp_path: Path) -> None:
    config = parse_config({}, base_dir=tmp_path)

    assert config.data_dir == tmp_path / "node-data"
    assert config.identity_path == tmp_path / "node-data" / "node.key"
    assert config.bus.backend == "libp2p"
    assert config.data_plane.listen == "tcp://127.0.0.1:0"
    assert config.torch_threads == 1
    assert config.models == ()


def test_config_relative_paths_resolved(tmp_path: Path) -> None:
    raw = {"data_dir": "data", "models": [{"path": "model", "fragments": ["head", "block[0:3]", "expert[1][5]"]}]}
    config = parse_config(raw, base_dir=tmp_path)

    assert config.data_dir == tmp_path / "data"
    assert config.models[0].path == tmp_path / "model"
    assert config.models[0].fragments == ("head", "block[0:3]", "expert[1][5]")
    assert config.models[0].display_name == "model"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"device": "tpu"}, "device = 'tpu' is invalid; expected one of auto, cpu, cuda"),
        ({"bus": {"backend": "kafka"}}, "bus.backend = 'kafka' is invalid; expected one of libp2p, nats, memory"),
        ({"bus": {"bakend": "nats"}}, "unknown key bus.bakend"),
        ({"torch_threads": 0}, "torch_threads = 0 is invalid; expected an integer >= 1"),
        ({"torch_threads": True}, "torch_threads = True is invalid"),
        ({"models": [{"fragments": "auto"}]}, "models[0].path is missing"),
        ({"models": [{"path": "m", "fragments": ["blocks"]}]}, "models[0].fragments = 'blocks' is invalid"),
        ({"data_plane": {"listen": "127.0.0.1:5555"}}, "data_plane.listen = '127.0.0.1:5555' is invalid"),
        ({"log_level": "loud"}, "log_level = 'loud' is invalid"),
        ({"models": {"path": "m"}}, "models = {'path': 'm'} is invalid; expected a list of mappings"),
    ],
)
def test_config_rejects_invalid_values(raw: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)

    assert message in str(caught.value)


def test_config_yaml_round_trip(tmp_path: Path) -> None:
    raw = {
        "data_dir": "data",
        "bus": {"backend": "nats", "nats_url": "nats://127.0.0.1:4222"},
        "models": [{"path": "m", "name": "demo", "memory_budget_mb": 64}],
        "log_level": "debug",
    }
    config = parse_config(raw, base_dir=tmp_path)
    path = tmp_path / "node.yaml"
    path.write_text(config_to_yaml(config))

    assert load_config(path) == config
    assert config.log_level == "DEBUG"


def test_config_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_config_invalid_yaml_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("bus: [unclosed\n")

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
