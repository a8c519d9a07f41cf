"""Node config schema: api.listen, package: paths, CORTEX_ overrides, path checks, the generated file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cortex.node.config import ConfigError, NodeConfig, config_to_yaml, load_config, package_dir, parse_config
from cortex.node.config_checks import check_paths, path_problems
from cortex.node.config_env import OVERRIDES, apply_environment, is_config_variable, without_overrides
from cortex.node.config_template import render_config
from cortex.node.hardware import Gpu, Hardware

ROOT = Path(__file__).resolve().parents[2]
CPU_MACHINE = Hardware(
    cpu_cores=8, cpu_model="Test CPU", machine="x86_64", ram_mb=32768, gpus=(), gpu_source="none",
    torch_cuda=False, disk_free_mb=100_000,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_api_listen_default_and_validation(tmp_path: Path) -> None:
    assert parse_config({}, base_dir=tmp_path).api.listen == "127.0.0.1:8470"
    assert parse_config({"api": {"listen": "[::1]:0"}}, base_dir=tmp_path).api.listen == "[::1]:0"
    for bad in ("8470", "127.0.0.1:99999", "http://127.0.0.1:8470"):
        with pytest.raises(ConfigError, match=re.escape(f"api.listen = {bad!r} is invalid; expected HOST:PORT")):
            parse_config({"api": {"listen": bad}}, base_dir=tmp_path)


def test_package_path_names_installed_package(tmp_path: Path) -> None:
    config = parse_config({"models": [{"path": "package:demo_model"}], "fallback_model": "package:demo_model"}, base_dir=tmp_path)

    assert config.models[0].path == package_dir() / "demo_model"
    assert config.fallback_model == package_dir() / "demo_model"
    assert (config.models[0].path / "config.json").is_file()


def test_env_overrides_every_kind(tmp_path: Path) -> None:
    path = _write(tmp_path, "bus:\n  backend: nats\nmodels:\n  - path: m\n")
    environ = {
        "CORTEX_DATA_DIR": "/srv/cortex",
        "CORTEX_BUS_BACKEND": "libp2p",
        "CORTEX_BUS_BOOTSTRAP": "/ip4/127.0.0.1/tcp/1/p2p/A, /ip4/127.0.0.1/tcp/2/p2p/B",
        "CORTEX_BUS_LISTEN": "[/ip4/127.0.0.1/tcp/4001]",
        "CORTEX_BUS_NATS_URL": "null",
        "CORTEX_DATA_PLANE_CALL_TIMEOUT_S": "2.5",
        "CORTEX_API_LISTEN": "0.0.0.0:9000",
        "CORTEX_TORCH_THREADS": "3",
        "CORTEX_FALLBACK_MODEL": "none",
        "CORTEX_LOG_LEVEL": "debug",
        "CORTEX_MODELS_0_FRAGMENTS": "head, block[0:2]",
        "CORTEX_MODELS_1_PATH": "package:demo_model",
        "CORTEX_MODELS_1_MEMORY_BUDGET_MB": "64",
        "CORTEX_HOME": "/not/a/config/key",
    }

    config = load_config(path, environ)

    assert config.data_dir == Path("/srv/cortex")
    assert config.bus.backend == "libp2p"
    assert config.bus.bootstrap == ("/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/127.0.0.1/tcp/2/p2p/B")
    assert config.bus.listen == ("/ip4/127.0.0.1/tcp/4001",)
    assert config.bus.nats_url is None
    assert config.data_plane.call_timeout_s == 2.5
    assert config.api.listen == "0.0.0.0:9000"
    assert config.torch_threads == 3
    assert config.fallback_model is None
    assert config.log_level == "DEBUG"
    assert config.models[0].fragments == ("head", "block[0:2]")
    assert config.models[1].path == package_dir() / "demo_model"
    assert config.models[1].memory_budget_mb == 64.0


def test_env_whole_models_list(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  - path: m\n")

    config = load_config(path, {"CORTEX_MODELS": "[{path: package:demo_model, fragments: [head]}]"})

    assert len(config.models) == 1
    assert config.models[0].fragments == ("head",)


def test_env_without_environ_reads_file_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "log_level: WARNING\n")
    monkeypatch.setenv("CORTEX_LOG_LEVEL", "DEBUG")

    assert load_config(path).log_level == "WARNING"
    assert load_config(path, os.environ).log_level == "DEBUG"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CORTEX_TORCH_THREADS": "many"}, "torch_threads = 'many' (set by environment variable CORTEX_TORCH_THREADS) is invalid"),
        ({"CORTEX_BUS_BACKEND": "kafka"}, "bus.backend = 'kafka' (set by environment variable CORTEX_BUS_BACKEND) is invalid"),
        ({"CORTEX_MODELS_0_MEMORY_BUDGET_MB": "-1"}, "models[0].memory_budget_mb = -1 (set by environment variable CORTEX_MODELS_0_MEMORY_BUDGET_MB)"),
        ({"CORTEX_BUS_BAKEND": "nats"}, "environment variable CORTEX_BUS_BAKEND names no config key; allowed: CORTEX_BUS_BACKEND"),
        ({"CORTEX_MODELS_0_PAHT": "x"}, "environment variable CORTEX_MODELS_0_PAHT names no config key"),
        ({"CORTEX_MODELS_5_PATH": "x"}, "names models[5], but the config has 1 models; use an index from 0 to 1"),
        ({"CORTEX_MODELS_1_NAME": "x"}, "models[1].path is missing (in the entry that environment variable CORTEX_MODELS_1_NAME set)"),
        ({"CORTEX_MODELS": "[{path: a"}, "environment variable CORTEX_MODELS = '[{path: a' is not valid YAML"),
    ],
)
def test_env_errors_name_variable(tmp_path: Path, environ: dict[str, str], message: str) -> None:
    path = _write(tmp_path, "models:\n  - path: m\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)

    assert message in str(caught.value)


def test_env_names_cover_every_key() -> None:
    keys = {(override.section, override.key) for override in OVERRIDES.values()}
    for name in ("data_dir", "identity", "kv_cache_budget_mb", "torch_threads", "device", "dtype", "fallback_model", "log_level"):
        assert (None, name) in keys
    for section, name in [("bus", "backend"), ("bus", "nats_url"), ("data_plane", "listen"), ("api", "listen")]:
        assert (section, name) in keys
    assert is_config_variable("CORTEX_MODELS_0_PATH")
    assert not is_config_variable("CORTEX_HOME")
    assert not is_config_variable("CORTEX_PROTOCOL_VERSION")
    kept = without_overrides({"CORTEX_DATA_DIR": "x", "CORTEX_HOME": "y", "PATH": "/bin"})
    assert kept == {"CORTEX_HOME": "y", "PATH": "/bin"}


@given(threads=st.integers(min_value=1, max_value=4096), budget=st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_env_numbers_round_trip(threads: int, budget: float) -> None:
    raw, origins = apply_environment(
        {"models": [{"path": "m"}]}, {"CORTEX_TORCH_THREADS": str(threads), "CORTEX_MODELS_0_MEMORY_BUDGET_MB": repr(budget)}, "test"
    )
    config = parse_config(raw, base_dir=Path("/"), origins=origins)

    assert config.torch_threads == threads
    assert config.models[0].memory_budget_mb == budget


def test_check_paths_names_each_key(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    config = parse_config(
        {"data_dir": str(blocked), "models": [{"path": "absent-model"}], "fallback_model": "absent-fallback"}, base_dir=tmp_path
    )

    problems = path_problems(config)

    assert len(problems) == 3
    assert problems[0].startswith(f"data_dir = '{blocked}' is unreachable: {blocked} exists but is not a folder")
    assert problems[1] == f"models[0].path = '{tmp_path / 'absent-model'}' is unreachable: expected an existing checkpoint folder"
    assert problems[2].startswith(f"fallback_model = '{tmp_path / 'absent-fallback'}' is unreachable")
    with pytest.raises(ConfigError, match="node.yaml: data_dir"):
        check_paths(config, "node.yaml")


def test_check_paths_accepts_creatable_folders(tmp_path: Path) -> None:
    config = parse_config({"data_dir": "new/deeper", "models": [{"path": "package:demo_model"}]}, base_dir=tmp_path)

    assert path_problems(config) == []


def test_generated_config_loads_with_every_key(tmp_path: Path) -> None:
    text = render_config(CPU_MACHINE)
    path = _write(tmp_path, text)

    config = load_config(path)

    assert config.data_dir == tmp_path
    assert config.identity_path == tmp_path / "node.key"
    assert config.device == "cpu"
    assert config.torch_threads == 8
    assert config.models[0].path == package_dir() / "demo_model"
    assert config.models[0].memory_budget_mb == 16384
    assert config.kv_cache_budget_mb == 4096
    assert config.fallback_model == package_dir() / "demo_model"
    assert path_problems(config) == []
    assert config_to_yaml(config)  # every field serializes
    documented = _keys(yaml.safe_load(text))
    defaults = _keys(yaml.safe_load(config_to_yaml(NodeConfig(data_dir=tmp_path))))
    model_keys = {"models[].path", "models[].name", "models[].fragments", "models[].memory_budget_mb"}
    assert documented == (defaults - {"models"}) | model_keys


def test_generated_config_comments_every_key() -> None:
    lines = render_config(CPU_MACHINE).splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^\s*(- )?[a-z_]+:", line) and not line.rstrip().endswith(":"):
            previous = lines[index - 1].strip()
            assert previous.startswith("#") or "path: package:demo_model" in line or "fragments: auto" in line, line


def test_generated_config_same_bytes_each_time() -> None:
    assert render_config(CPU_MACHINE) == render_config(CPU_MACHINE)


def test_generated_config_uses_cuda_gpu() -> None:
    gpu_machine = Hardware(
        cpu_cores=16, cpu_model="Test CPU", machine="x86_64", ram_mb=131072, gpus=(Gpu("Test GPU", 81920),),
        gpu_source="torch", torch_cuda=True, disk_free_mb=1,
    )

    config = parse_config(yaml.safe_load(render_config(gpu_machine)), base_dir=Path("/"))

    assert config.device == "cuda"
    assert config.dtype == "bfloat16"
    assert config.models[0].memory_budget_mb == 40960


def test_generated_config_gpu_without_cuda_torch_stays_cpu() -> None:
    machine = Hardware(
        cpu_cores=4, cpu_model="Test CPU", machine="x86_64", ram_mb=1000, gpus=(Gpu("Test GPU", 16384),),
        gpu_source="nvidia-smi", torch_cuda=False, disk_free_mb=1,
    )
    text = render_config(machine)

    config = parse_config(yaml.safe_load(text), base_dir=Path("/"))

    assert config.device == "cpu"
    assert config.models[0].memory_budget_mb == 256  # the floor: half of 1000 MiB rounds below it
    assert "install a CUDA build of torch 2.13.0" in text
    assert "Test GPU (16384 MiB), found by nvidia-smi" in text


def _keys(mapping: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(mapping, dict):
        for key, value in mapping.items():
            if isinstance(value, dict):
                keys |= _keys(value, f"{prefix}{key}.")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                keys |= _keys(value[0], f"{prefix}{key}[].")
            else:
                keys.add(f"{prefix}{key}")
    return keys


def test_env_misspelt_top_level_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, "log_level: INFO\n")

    config = load_config(path, {"CORTEX_LOG_LEVLE": "DEBUG", "CORTEX_PROTOCOL_VERSION": "1.0"})

    assert config.log_level == "INFO"
    assert "environment variable CORTEX_LOG_LEVLE is not a config key; did you mean CORTEX_LOG_LEVEL?" in caplog.text
    assert "CORTEX_PROTOCOL_VERSION" not in caplog.text
