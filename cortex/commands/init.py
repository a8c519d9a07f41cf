"""`cortex init`: set up the Cortex home folder with a node identity and a config for this machine."""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--print", action="store_true", help="print the config it would write and change nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cortex.node.home import cortex_home
    from cortex.node.setup import SetupError, set_up_home

    home = args.home.expanduser().absolute() if args.home is not None else cortex_home()
    if args.print:
        from cortex.node.config_template import render_config
        from cortex.node.hardware import detect_hardware

        sys.stdout.write(render_config(detect_hardware(home)))
        return 0
    try:
        report = set_up_home(home, force=args.force)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    for line in report.lines():
        print(line)
    return 0
