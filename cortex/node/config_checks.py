"""Checks that every path a node config names can be reached, before the node starts.

`load_config` checks keys and values only, so a config can be written and read on a machine
that lacks its folders (tests, the demo launcher, another host). `check_paths` is the second
step, run by `cortex node start` and `cortex init`. This user must be able to create and write
the data folder and the key file's folder, and every model and the fallback model must be
existing folders. A key file must be readable. Only the default key file `<data_dir>/node.key`
may be missing (the node creates it), because a mistyped explicit path would give the node a
new identity.
"""

from __future__ import annotations

import os
from pathlib import Path

from cortex.node.config import PACKAGE_PREFIX, ConfigError, NodeConfig, package_dir
from cortex.node.home import directory_problem

DEFAULT_KEY_NAME = "node.key"


def path_problems(config: NodeConfig) -> list[str]:
    """Return one message per unreachable path, each naming the key, the value and what is expected."""
    problems: list[str] = []
    data_problem = directory_problem(config.data_dir)
    if data_problem:
        problems.append(f"data_dir = '{config.data_dir}' is unreachable: {data_problem}")
    identity_problem = _identity_problem(config)
    if identity_problem:
        problems.append(identity_problem)
    for index, model in enumerate(config.models):
        if not model.path.is_dir():
            problems.append(
                f"models[{index}].path = '{written_path(model.path)}' is unreachable: expected an existing checkpoint folder"
            )
    if config.fallback_model is not None and not config.fallback_model.is_dir():
        problems.append(
            f"fallback_model = '{written_path(config.fallback_model)}' is unreachable: expected an existing checkpoint "
            "folder, or none to run without a fallback model"
        )
    return problems


def is_default_identity(config: NodeConfig) -> bool:
    """Return whether the key file is `<data_dir>/node.key`, the one a node creates when it is missing."""
    return config.identity is None or config.identity == config.data_dir / DEFAULT_KEY_NAME


def _identity_problem(config: NodeConfig) -> str | None:
    identity = config.identity_path
    key = "identity" if config.identity is not None else f"data_dir (the key file <data_dir>/{DEFAULT_KEY_NAME})"
    if identity.exists():
        if not identity.is_file() or not os.access(identity, os.R_OK):
            return f"{key} = '{identity}' is unreachable: expected a key file this user can read"
        return None
    if not is_default_identity(config):
        # A mistyped path would otherwise give the node a new key, and so a new peer id.
        return (
            f"identity = '{identity}' is not found: a key file named explicitly must exist; fix the path, "
            f"or remove the identity key to use <data_dir>/{DEFAULT_KEY_NAME} (created when missing; "
            "`cortex init` creates the one of its config)"
        )
    if config.identity is None:
        return None  # the data_dir check already covers the key file's folder
    key_folder_problem = directory_problem(identity.parent)
    return f"identity = '{identity}' is unreachable: {key_folder_problem}" if key_folder_problem else None


def written_path(path: Path) -> str:
    """Return `path` as a config would write it: `package:NAME` for a path inside the cortex package."""
    try:
        return PACKAGE_PREFIX + path.relative_to(package_dir()).as_posix()
    except ValueError:
        return str(path)


def check_paths(config: NodeConfig, source: str) -> None:
    """Raise ConfigError listing every unreachable path of `config` (read from `source`)."""
    problems = path_problems(config)
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
