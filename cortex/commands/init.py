"""`cortex init`: set up the Cortex home folder with a node identity and a config for this machine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "init",
        help="create the node identity and a config for this machine in ~/.cortex",
        description=(
            "Create the Cortex home folder ($CORTEX_HOME, else ~/.cortex), generate the node's Ed25519 key "
            "if it has none (an existing key is never replaced), detect the hardware (CPU, RAM, GPUs, free "
            "disk) and write config.yaml sized for it. An existing config.yaml is kept: the generated one "
            "goes to config.yaml.new beside it. Running it again changes no file. Exit status: 0 done, "
            "2 invalid config, 3 a folder or file this user may not write."
        ),
    )
    parser.add_argument("--home", type=Path, default=None, help="the folder to set up (default: $CORTEX_HOME, else ~/.cortex)")
    parser.add_argument(
        "--force", action="store_true", help="replace config.yaml with the generated config, keeping the old one as config.yaml.old"
    )
    parser.add_argument(
        "--print", action="store_true",
        help="print the config it would write and change nothing. CORTEX_... environment variables are not applied "
        "to the printed keys (the node applies them when it loads the config); the output lists the ones set",
    )
    parser.set_defaults(func=run)


def _overrides_note(environ: Mapping[str, str]) -> str:
    """Return comment lines naming the config overrides set in `environ`, or "" if none is set."""
    from cortex.node.config_env import is_config_variable

    names = sorted(name for name in environ if is_config_variable(name))
    if not names:
        return ""
    lines = ["", "# NOTE: these environment variables are set, and the node applies them over the keys above when", "# it loads this config:"]
    lines += [f"#   {name}={environ[name]}" for name in names]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from cortex.node.home import cortex_home
    from cortex.node.setup import SetupError, set_up_home

    home = args.home.expanduser().absolute() if args.home is not None else cortex_home()
    if args.print:
        from cortex.node.config_template import render_config
        from cortex.node.hardware import detect_hardware

        sys.stdout.write(render_config(detect_hardware(home)))
        sys.stdout.write(_overrides_note(os.environ))
        return 0
    try:
        report = set_up_home(home, force=args.force)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    for line in report.lines():
        print(line)
    return 0
