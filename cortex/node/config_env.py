"""Environment variables that override node config keys (`cortex node start` reads them).

A key's variable is `CORTEX_` followed by its path in upper case, with `_` between the parts:

    data_dir                   CORTEX_DATA_DIR
    bus.nats_url               CORTEX_BUS_NATS_URL
    data_plane.call_timeout_s  CORTEX_DATA_PLANE_CALL_TIMEOUT_S
    api.listen                 CORTEX_API_LISTEN
    models[1].memory_budget_mb CORTEX_MODELS_1_MEMORY_BUDGET_MB
    models (the whole list)    CORTEX_MODELS, a YAML flow list such as [{path: package:demo_model}]

Values are text, read by the key's type. Numbers are read as Python reads them (`4`, `2.5`,
`1e3`), and lists either as a YAML flow list (`[a, b]`) or as comma-separated items. An optional key is null when the value
is empty, `null` or `~`. Every other key takes the text itself. `CORTEX_MODELS_<i>_<KEY>` changes entry
i of `models`, and i equal to the number of entries appends one (it then needs its `_PATH`).

A variable under a section prefix (`CORTEX_BUS_`, `CORTEX_DATA_PLANE_`, `CORTEX_API_`,
`CORTEX_MODELS_`) that names no key is an error. Other `CORTEX_` variables are not config keys
(`CORTEX_HOME`, `CORTEX_PROTOCOL_VERSION` and others are read elsewhere), so they are ignored;
one that looks like a misspelt key name is logged as a warning.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from cortex.node.config import ConfigError, ModelSettings, NodeConfig

logger = logging.getLogger(__name__)

PREFIX = "CORTEX_"
MODELS_KEY = "models"
_MODEL_ITEM = re.compile(r"^CORTEX_MODELS_(\d+)_([A-Z0-9_]+)$")


@dataclass(frozen=True)
class Override:
    """One config key that an environment variable may set."""

    variable: str
    section: str | None  # None: a top-level key
    key: str
    kind: str  # "number", "list", "optional", "fragments" or "text"


def _kind(type_text: str) -> str:
    if "tuple[str, ...] | None" in type_text:
        return "fragments"
    if type_text.startswith("tuple[str"):
        return "list"
    if type_text in ("int", "float"):
        return "number"
    if "None" in type_text:
        return "optional"
    return "text"


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(cls))


def _top_level_and_sections() -> tuple[dict[str, Override], dict[str, type]]:
    """Derive the variable names from NodeConfig, so a new config field gets its variable at once."""
    overrides: dict[str, Override] = {}
    sections: dict[str, type] = {}
    for config_field in _fields(NodeConfig):
        factory = config_field.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            sections[config_field.name] = factory
            for inner in _fields(factory):
                variable = f"{PREFIX}{config_field.name}_{inner.name}".upper()
                overrides[variable] = Override(variable, config_field.name, inner.name, _kind(str(inner.type)))
        elif config_field.name != MODELS_KEY:
            variable = f"{PREFIX}{config_field.name}".upper()
            overrides[variable] = Override(variable, None, config_field.name, _kind(str(config_field.type)))
    return overrides, sections


OVERRIDES, SECTIONS = _top_level_and_sections()
MODEL_KEYS: dict[str, Override] = {
    model_field.name.upper(): Override("", MODELS_KEY, model_field.name, _kind(str(model_field.type)))
    for model_field in _fields(ModelSettings)
}
SECTION_PREFIXES = tuple(f"{PREFIX}{name.upper()}_" for name in (*SECTIONS, MODELS_KEY))


def is_config_variable(name: str) -> bool:
    """Return whether the environment variable `name` is read as a config override."""
    return name in OVERRIDES or name == f"{PREFIX}MODELS" or name.startswith(SECTION_PREFIXES)


def without_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of `environ` without config overrides, for child nodes that have their own config."""
    return {name: value for name, value in environ.items() if not is_config_variable(name)}


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Return `raw` with the `CORTEX_...` overrides of `environ` applied, and which variable set which key."""
    result = copy.deepcopy(raw)
    origins: dict[str, str] = {}
    whole_models = environ.get(f"{PREFIX}MODELS")
    if whole_models is not None:
        result[MODELS_KEY] = _parse_value(f"{PREFIX}MODELS", whole_models, "yaml", source)
        origins[MODELS_KEY] = f"{PREFIX}MODELS"
    for variable in sorted(environ):
        if not variable.startswith(PREFIX) or variable == f"{PREFIX}MODELS":
            continue
        value = environ[variable]
        override = OVERRIDES.get(variable)
        if override is not None:
            _set(result, override, _parse_value(variable, value, override.kind, source))
            origins[f"{override.section}.{override.key}" if override.section else override.key] = variable
        elif variable.startswith(f"{PREFIX}MODELS_"):
            dotted = _set_model_key(result, variable, value, source)
            origins[dotted] = variable
        elif variable.startswith(SECTION_PREFIXES):
            raise ConfigError(f"environment variable {variable} names no config key; allowed: {_allowed_in(variable)}")
        else:
            _warn_if_misspelt(variable)
    return result, origins


def _set(raw: dict[str, Any], override: Override, value: Any) -> None:
    if override.section is None:
        raw[override.key] = value
        return
    section = raw.get(override.section)
    if section is None:
        section = raw[override.section] = {}
    if isinstance(section, dict):
        section[override.key] = value
    # A section that is not a mapping stays as it is, so the parser reports it by key.


def _set_model_key(raw: dict[str, Any], variable: str, value: str, source: str) -> str:
    match = _MODEL_ITEM.match(variable)
    override = MODEL_KEYS.get(match.group(2)) if match else None
    if match is None or override is None:
        allowed = ", ".join(f"{PREFIX}MODELS_<i>_{key}" for key in MODEL_KEYS)
        raise ConfigError(f"environment variable {variable} names no config key; allowed: {PREFIX}MODELS, {allowed}")
    models = raw.get(MODELS_KEY)
    if models is None:
        models = raw[MODELS_KEY] = []
    if not isinstance(models, list):
        raise ConfigError(f"{source}: environment variable {variable} sets an entry of models, but models is not a list")
    index = int(match.group(1))
    if index > len(models):
        raise ConfigError(
            f"environment variable {variable} names models[{index}], but the config has {len(models)} "
            f"models; use an index from 0 to {len(models)} (index {len(models)} appends one)"
        )
    if index == len(models):
        models.append({})
    if isinstance(models[index], dict):
        models[index][override.key] = _parse_value(variable, value, override.kind, source)
    return f"{MODELS_KEY}[{index}].{override.key}"


def _parse_value(variable: str, value: str, kind: str, source: str) -> Any:
    text = value.strip()
    if kind == "optional":
        return None if text in ("", "null", "~") else text
    if kind == "text":
        return text
    if kind == "number":
        return _number(text)
    if kind in ("list", "fragments") and not text.startswith("["):
        if kind == "fragments" and text == "auto":
            return text
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: environment variable {variable} = {value!r} is not valid YAML: {error}") from None


def _number(text: str) -> int | float | str:
    """Return `text` as an int or a float (Python syntax, so 1e3 counts), else unchanged for the parser to reject."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _allowed_in(variable: str) -> str:
    prefix = next(prefix for prefix in SECTION_PREFIXES if variable.startswith(prefix))
    return ", ".join(name for name in OVERRIDES if name.startswith(prefix))


def _warn_if_misspelt(variable: str) -> None:
    close = difflib.get_close_matches(variable, list(OVERRIDES), n=1, cutoff=0.85)
    if close:
        logger.warning("environment variable %s is not a config key; did you mean %s?", variable, close[0])
