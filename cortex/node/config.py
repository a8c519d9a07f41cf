"""Node configuration: one YAML file per node, validated before anything starts.

Every key, its default and its meaning. A relative path is resolved against the config
file's folder, and a path written `package:NAME` names NAME inside the installed `cortex`
package (`package:demo_model` is the bundled demo model), so one config file works both
on the host and in the container.

    data_dir: ./node-data            # log store, pid file, bus state; created if missing
    identity: null                   # Ed25519 key file; null means <data_dir>/node.key
    bus:
      backend: libp2p                # libp2p | nats | memory (memory: tests in one process only)
      listen: [/ip4/127.0.0.1/tcp/0] # libp2p listen multiaddrs
      bootstrap: []                  # libp2p multiaddrs with /p2p/<peer id> to dial at start
      nats_url: null                 # NATS server URL; null starts a local nats-server
      join_wait_s: 2.0               # how long the join sync waits for a first peer
    data_plane:
      listen: tcp://127.0.0.1:0      # ZeroMQ ROUTER endpoint; port 0 picks a free port
      call_timeout_s: 10.0           # one block or expert call, before it is retried elsewhere
    api:
      listen: 127.0.0.1:8470         # HOST:PORT reserved for an HTTP API; nothing listens on it yet
    models:                          # models this node serves
      - path: ./demo_model           # checkpoint folder
        name: null                   # human name announced with the model; null: folder name
        fragments: auto              # auto, or a list such as [head, "block[0:3]", "expert[1][0]"]
        memory_budget_mb: 1024       # for auto: MiB of fragments this node may claim (fractions allowed)
    kv_cache_budget_mb: 256          # KV-cache MiB (fractions allowed) a block holder admits across sessions
    torch_threads: 1                 # torch.set_num_threads for this node process
    device: auto                     # auto | cpu | cuda
    dtype: float32                   # float32 | bfloat16 | float16
    fallback_model: <demo model>     # light local model for degraded mode (docs/degraded.md); null or none: off
    log_level: INFO                  # DEBUG | INFO | WARNING | ERROR
    library_log_level: WARNING       # the same levels, for libp2p, multiaddr, asyncio, nats and trio
    quorum:                          # cross-checks of expert outputs (docs/quorum.md)
      redundancy: 1                  # minimum replicas per expert call for every request this node routes, 1..8
      spot_check: 0.0                # probability (0..1) that a call with one replica also goes to a second
      seed: 0                        # seed of the spot-check draw, recorded in each spot-check vote
      probe: 0.02                    # probability (0..1) that a replicated call also probes an excluded peer
      fault: null                    # TEST ONLY: a fault mode of cortex.node.faults, such as scale=1.10

`load_config(path, environ)` returns a `NodeConfig`; any wrong key or value raises
`ConfigError` with the key, the value and what is allowed. With `environ` (for example
`os.environ`), variables such as `CORTEX_BUS_BACKEND` override keys first: see
`cortex.node.config_env` for the names. `cortex.node.config_checks.check_paths` then checks
that every path can be reached; docs/config.md documents the whole schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUS_BACKENDS = ("libp2p", "nats", "memory")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Loggers of the libraries a node uses, set by library_log_level: at DEBUG they log
# thousands of lines a minute on an idle node, so log_level does not reach them.
LIBRARY_LOGGERS = ("libp2p", "multiaddr", "asyncio", "nats", "trio")
AUTO = "auto"
DEFAULT_MEMORY_BUDGET_MB = 1024
DEFAULT_KV_CACHE_BUDGET_MB = 256
MAX_REDUNDANCY = 8
_FRAGMENT = re.compile(r"^(head|block\[\d+:\d+\]|expert\[\d+\]\[\d+\])$")
PACKAGE_PREFIX = "package:"
DEFAULT_API_LISTEN = "127.0.0.1:8470"
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class ConfigError(ValueError):
    """A node config file that is missing, unreadable, or has wrong keys or values (one line each).

    `variables` names the environment variables that set an invalid key, so a fix can name them.
    """

    def __init__(self, message: str, variables: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.variables = variables


@dataclass(frozen=True)
class BusSettings:
    backend: str = "libp2p"
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    nats_url: str | None = None
    join_wait_s: float = 2.0


@dataclass(frozen=True)
class DataPlaneSettings:
    listen: str = "tcp://127.0.0.1:0"
    call_timeout_s: float = 10.0


@dataclass(frozen=True)
class ApiSettings:
    """Address reserved for an HTTP API. NOTE: Cortex has no HTTP API yet, so nothing listens here."""

    listen: str = DEFAULT_API_LISTEN


@dataclass(frozen=True)
class ModelSettings:
    """One model to serve: explicit fragments, or `auto` within a memory budget."""

    path: Path
    name: str | None = None
    fragments: tuple[str, ...] | None = None  # None means auto
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB

    @property
    def display_name(self) -> str:
        return self.name or self.path.name


@dataclass(frozen=True)
class QuorumConfig:
    """Quorum policy of the node (docs/quorum.md); `fault` is a test-only fault mode."""

    redundancy: int = 1
    spot_check: float = 0.0
    seed: int = 0
    fault: str | None = None
    probe: float = 0.02


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    identity: Path | None = None
    bus: BusSettings = field(default_factory=BusSettings)
    data_plane: DataPlaneSettings = field(default_factory=DataPlaneSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    models: tuple[ModelSettings, ...] = ()
    kv_cache_budget_mb: float = DEFAULT_KV_CACHE_BUDGET_MB
    torch_threads: int = 1
    device: str = "auto"
    dtype: str = "float32"
    fallback_model: Path | None = Path(__file__).resolve().parent.parent / "demo_model"  # the packaged demo model
    log_level: str = "INFO"
    library_log_level: str = "WARNING"
    quorum: QuorumConfig = field(default_factory=QuorumConfig)

    @property
    def identity_path(self) -> Path:
        return self.identity if self.identity is not None else self.data_dir / "node.key"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "node.pid"


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read and validate the YAML node config at `path`, with `CORTEX_...` overrides from `environ` if given."""
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {config_path} not found; write one (see docs/node.md)") from None
    except OSError as error:
        raise ConfigError(f"config file {config_path} could not be read: {error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        # PyYAML names a string input "<unicode string>" in its marks; name the file instead.
        detail = str(error).replace('"<unicode string>"', f'"{config_path}"')
        raise ConfigError(f"config file {config_path} is not valid YAML: {detail}") from None
    raw = raw if raw is not None else {}
    origins: dict[str, str] = {}
    if environ is not None:
        from cortex.node.config_env import apply_environment

        raw, origins = apply_environment(raw, environ, source=str(config_path))
    return parse_config(raw, base_dir=config_path.parent, source=str(config_path), origins=origins)


def parse_config(raw: Any, base_dir: Path, source: str = "config", origins: Mapping[str, str] | None = None) -> NodeConfig:
    """Validate a parsed YAML mapping; relative paths are resolved against `base_dir`.

    `origins` maps a dotted key (`bus.backend`, `models[0].path`) to the environment variable
    that set it, so an error about that key names the variable. Every invalid key is reported
    in one ConfigError, one line each.
    """
    reader = _Reader(raw, "", source, dict(origins or {}), _Problems())
    data_dir = _path(reader.string("data_dir", "./node-data"), base_dir)
    identity = reader.optional_string("identity")
    fallback = reader.optional_string("fallback_model")
    config = NodeConfig(
        data_dir=data_dir,
        identity=_path(identity, base_dir) if identity else None,
        bus=_bus(reader.section("bus")),
        data_plane=_data_plane(reader.section("data_plane")),
        api=_api(reader.section("api")),
        models=tuple(_model(item, base_dir) for item in reader.list_of_sections("models")),
        kv_cache_budget_mb=reader.number("kv_cache_budget_mb", DEFAULT_KV_CACHE_BUDGET_MB, minimum=0.0),
        torch_threads=reader.integer("torch_threads", 1, minimum=1),
        device=reader.choice("device", "auto", DEVICES),
        dtype=reader.choice("dtype", "float32", DTYPES),
        fallback_model=NodeConfig.fallback_model if "fallback_model" not in reader.raw_mapping else _path(fallback, base_dir) if fallback and fallback.lower() != "none" else None,
        log_level=reader.choice("log_level", "INFO", LOG_LEVELS, upper=True),
        library_log_level=reader.choice("library_log_level", "WARNING", LOG_LEVELS, upper=True),
        quorum=_quorum(reader.section("quorum")),
    )
    reader.reject_unknown()
    reader.problems.raise_if_any()
    return config


def package_dir() -> Path:
    """Return the folder of the installed `cortex` package, which `package:NAME` paths start from."""
    import cortex

    return Path(cortex.__file__).resolve().parent


def _path(value: str, base_dir: Path) -> Path:
    if value.startswith(PACKAGE_PREFIX):
        return package_dir() / value[len(PACKAGE_PREFIX):].lstrip("/")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _api(reader: _Reader) -> ApiSettings:
    listen = reader.string("listen", DEFAULT_API_LISTEN)
    match = _HOST_PORT.match(listen)
    if match is None or int(match.group(2)) > 65535:
        reader.fail("listen", listen, "HOST:PORT with a port from 0 to 65535, such as 127.0.0.1:8470 or [::1]:8470")
    reader.reject_unknown()
    return ApiSettings(listen=listen)


def _quorum(reader: _Reader) -> QuorumConfig:
    from cortex.node.faults import FaultSpecError, parse_fault

    redundancy = reader.integer("redundancy", 1, minimum=1, maximum=MAX_REDUNDANCY)
    spot_check = reader.number("spot_check", 0.0, minimum=0.0)
    if spot_check > 1.0:
        reader.fail("spot_check", spot_check, "a probability from 0 to 1")
    fault = reader.optional_string("fault")
    if fault is not None:
        try:
            parse_fault(fault)
        except FaultSpecError as error:
            reader.fail("fault", fault, f"a test fault mode ({error})")
    probe = reader.number("probe", 0.02, minimum=0.0)
    if probe > 1.0:
        reader.fail("probe", probe, "a probability from 0 to 1")
    config = QuorumConfig(redundancy, spot_check, reader.integer("seed", 0, minimum=0), fault, probe)
    reader.reject_unknown()
    return config


def _bus(reader: _Reader) -> BusSettings:
    settings = BusSettings(
        backend=reader.choice("backend", "libp2p", BUS_BACKENDS),
        listen=reader.strings("listen", BusSettings.listen),
        bootstrap=reader.strings("bootstrap", ()),
        nats_url=reader.optional_string("nats_url"),
        join_wait_s=reader.number("join_wait_s", 2.0, minimum=0.0),
    )
    reader.reject_unknown()
    return settings


def _data_plane(reader: _Reader) -> DataPlaneSettings:
    listen = reader.string("listen", DataPlaneSettings.listen)
    if not re.match(r"^(tcp|ipc|inproc)://", listen):
        reader.fail("listen", listen, "a ZeroMQ endpoint such as tcp://127.0.0.1:0")
    settings = DataPlaneSettings(listen=listen, call_timeout_s=reader.number("call_timeout_s", 10.0, minimum=0.001))
    reader.reject_unknown()
    return settings


def _model(reader: _Reader, base_dir: Path) -> ModelSettings:
    path = _path(reader.string("path", None), base_dir)
    raw_fragments = reader.raw("fragments", AUTO)
    fragments: tuple[str, ...] | None = None
    if raw_fragments != AUTO:
        fragments = reader.strings("fragments", ())
        for fragment in fragments:
            if not _FRAGMENT.match(fragment):
                reader.fail("fragments", fragment, "head, block[a:b] or expert[l][e], or the word auto")
    settings = ModelSettings(
        path=path,
        name=reader.optional_string("name"),
        fragments=fragments,
        memory_budget_mb=reader.number("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB, minimum=0.0),
    )
    reader.reject_unknown()
    return settings


class _Problems:
    """The invalid keys found so far, so that one ConfigError lists them all."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.variables: list[str] = []

    def add(self, line: str, variable: str | None = None) -> None:
        self.lines.append(line)
        if variable:
            self.variables.append(variable)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines), tuple(self.variables))


class _Reader:
    """Typed access to one YAML mapping that remembers which keys were read.

    An invalid value is recorded in `problems` and replaced by the key's default. Parsing goes
    on, so `parse_config` can raise one ConfigError that lists every invalid key.
    """

    def __init__(self, raw: Any, prefix: str, source: str, origins: dict[str, str], problems: _Problems) -> None:
        self.prefix = prefix
        self.source = source
        self.origins = origins
        self.problems = problems
        self.seen: set[str] = set()
        if not isinstance(raw, dict):
            where = prefix.rstrip(".") or "the top level"
            problems.add(f"{source}: {where} must be a mapping of keys to values, got {type(raw).__name__}")
            raw = {}
        self.raw_mapping: dict[str, Any] = raw

    def fail(self, key: str, value: Any, allowed: str) -> None:
        variable = self.origins.get(f"{self.prefix}{key}")
        where = f" (set by environment variable {variable})" if variable else ""
        self.problems.add(f"{self.source}: {self.prefix}{key} = {value!r}{where} is invalid; expected {allowed}", variable)

    def raw(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        value = self.raw_mapping.get(key, default)
        return default if value is None and default is not None else value

    def string(self, key: str, default: str | None) -> str:
        value = self.raw(key, default)
        if value is None:
            setters = sorted(variable for dotted, variable in self.origins.items() if dotted.startswith(self.prefix))
            where = f" (in the entry that environment variable {setters[0]} set)" if setters and self.prefix else ""
            variable = setters[0] if setters and self.prefix else None
            self.problems.add(f"{self.source}: {self.prefix}{key} is missing{where}; it is required", variable)
            return "."
        if not isinstance(value, str) or not value:
            self.fail(key, value, "a non-empty string")
            return default if default is not None else "."
        return str(value)

    def optional_string(self, key: str) -> str | None:
        value = self.raw(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            self.fail(key, value, "a non-empty string or null")
            return None
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(key, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.fail(key, value, "a list of non-empty strings")
            return default
        return tuple(value)

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
            self.fail(key, value, f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}")
            return default
        return int(value)

    def number(self, key: str, default: float, minimum: float) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            self.fail(key, value, f"a number >= {minimum}")
            return default
        return float(value)

    def choice(self, key: str, default: str, allowed: tuple[str, ...], upper: bool = False) -> str:
        value = self.raw(key, default)
        normalized = value.upper() if upper and isinstance(value, str) else value
        if normalized not in allowed:
            self.fail(key, value, f"one of {', '.join(allowed)}")
            return default
        return str(normalized)

    def section(self, key: str) -> _Reader:
        return _Reader(self.raw(key, {}), f"{self.prefix}{key}.", self.source, self.origins, self.problems)

    def list_of_sections(self, key: str) -> list[_Reader]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            self.fail(key, value, "a list of mappings")
            return []
        return [
            _Reader(item, f"{self.prefix}{key}[{index}].", self.source, self.origins, self.problems)
            for index, item in enumerate(value)
        ]

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.raw_mapping) - self.seen)
        allowed = ", ".join(sorted(self.seen))
        for key in unknown:
            self.problems.add(f"{self.source}: unknown key {self.prefix}{key}; allowed keys here: {allowed}")


def config_to_yaml(config: NodeConfig) -> str:
    """Write `config` as YAML that `load_config` reads back to an equal config (absolute paths)."""
    data: dict[str, Any] = {
        "data_dir": str(config.data_dir),
        "identity": str(config.identity) if config.identity else None,
        "bus": {
            "backend": config.bus.backend,
            "listen": list(config.bus.listen),
            "bootstrap": list(config.bus.bootstrap),
            "nats_url": config.bus.nats_url,
            "join_wait_s": config.bus.join_wait_s,
        },
        "data_plane": {"listen": config.data_plane.listen, "call_timeout_s": config.data_plane.call_timeout_s},
        "api": {"listen": config.api.listen},
        "models": [
            {
                "path": str(model.path),
                "name": model.name,
                "fragments": list(model.fragments) if model.fragments is not None else AUTO,
                "memory_budget_mb": model.memory_budget_mb,
            }
            for model in config.models
        ],
        "kv_cache_budget_mb": config.kv_cache_budget_mb,
        "torch_threads": config.torch_threads,
        "device": config.device,
        "dtype": config.dtype,
        "fallback_model": str(config.fallback_model) if config.fallback_model else None,
        "log_level": config.log_level,
        "library_log_level": config.library_log_level,
        "quorum": {
            "redundancy": config.quorum.redundancy,
            "spot_check": config.quorum.spot_check,
            "seed": config.quorum.seed,
            "fault": config.quorum.fault,
            "probe": config.quorum.probe,
        },
    }
    return yaml.safe_dump(data, sort_keys=False)
