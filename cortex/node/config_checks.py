"""Checks that every path a node config names can be reached, before the node starts.

`load_config` checks keys and values only, so a config can be written and read on a machine
that lacks its folders (tests, the demo launcher, another host). `check_paths` is the second
step, run by `cortex node start` and `cortex init`. This user must be able to create and write
the data folder and the key file's folder, an existing key file must be a readable file, and
every model and the fallback model must be existing folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from cortex.node.config import ConfigError, NodeConfig
from cortex.node.home import directory_problem


def path_problems(config: NodeConfig) -> list[str]:
    """Return one message per unreachable path, each naming the key, the value and what is expected."""
    problems: list[str] = []
    data_problem = directory_problem(config.data_dir)
    if data_problem:
        problems.append(f"data_dir = '{config.data_dir}' is unreachable: {data_problem}")
    identity_key = "identity" if config.identity is not None else "data_dir (the key file <data_dir>/node.key)"
    identity = config.identity_path
    if identity.exists():
        if not identity.is_file() or not os.access(identity, os.R_OK):
            problems.append(f"{identity_key} = '{identity}' is unreachable: expected a key file this user can read")
    elif config.identity is not None:
        key_folder_problem = directory_problem(identity.parent)
        if key_folder_problem:
            problems.append(f"identity = '{identity}' is unreachable: {key_folder_problem}")
    for index, model in enumerate(config.models):
        if not model.path.is_dir():
            problems.append(f"models[{index}].path = '{model.path}' is unreachable: expected an existing checkpoint folder")
    if config.fallback_model is not None and not config.fallback_model.is_dir():
        problems.append(
            f"fallback_model = '{config.fallback_model}' is unreachable: expected an existing checkpoint folder, "
            "or none to run without a fallback model"
        )
    return problems


def check_paths(config: NodeConfig, source: str) -> None:
    """Raise ConfigError listing every unreachable path of `config` (read from `source`)."""
    problems = path_problems(config)
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
