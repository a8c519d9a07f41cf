"""`cortex node start|stop`: run one swarm node, or stop the node of a data directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cortex.node.lifecycle import STOP_WAIT_S


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help="start or stop a swarm node",
        description="Start a Cortex node from a YAML config (see docs/node.md), or stop the node of a data directory.",
    )
    commands = parser.add_subparsers(dest="node_command", metavar="COMMAND")
    start = commands.add_parser(
        "start",
        help="run a node in the foreground until SIGTERM or Ctrl-C",
        description=(
            "Join the swarm, load the fragments the config names (or pick them automatically), serve them and "
            "drive requests. SIGTERM drains running requests, publishes PeerLeft and exits."
        ),
    )
    start.add_argument(
        "--config", type=Path, default=None,
        help="node config file (YAML; default: $CORTEX_HOME/config.yaml, else ~/.cortex/config.yaml, as cortex init writes it). "
        "CORTEX_... environment variables override its keys (docs/config.md)",
    )
    start.set_defaults(func=_run_start)

    stop = commands.add_parser(
        "stop",
        help="send SIGTERM to the node started from a data directory",
        description=(
            "Find the node's pid file in its data directory, send it SIGTERM, so it drains and leaves, and wait "
            f"(up to {STOP_WAIT_S:.0f} s) until the process has exited. Exit status: 0 stopped, 1 no node was "
            "running from that data directory or it was still running after the wait, 2 invalid config."
        ),
    )
    where = stop.add_mutually_exclusive_group()
    where.add_argument("--data-dir", type=Path, help="the node's data directory")
    where.add_argument(
        "--config", type=Path,
        help="the node's config file, whose data_dir is used (default: $CORTEX_HOME/config.yaml, else ~/.cortex/config.yaml)",
    )
    stop.set_defaults(func=_run_stop)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _check_models(config: Any, config_path: str) -> str | None:
    """Check every configured checkpoint and fragment before the node joins; return the problem or None.

    A node that joined and then failed to load would announce claims it cannot serve.
    """
    from cortex.runtime.errors import ModelRuntimeError
    from cortex.runtime.loader import Loader
    from cortex.runtime.spec import check_fragment_spec, parse_fragment_spec

    for index, model in enumerate(config.models):
        try:
            loader = Loader(model.path, device="cpu")
            for fragment in model.fragments or ():
                spec = parse_fragment_spec(fragment)
                check_fragment_spec(spec, loader.num_layers, loader.is_moe_layer, loader.num_experts)
        except ModelRuntimeError as error:
            return f"{config_path}: models[{index}]: {error}"
    return None


def _startup_error(error: BaseException) -> BaseException | None:
    """Return the known start-up error inside `error` (bad key file, bus, checkpoint), or None.

    The node runs in a task group, so a failure may arrive wrapped in an ExceptionGroup.
    """
    from cortex.bus.errors import BusError
    from cortex.runtime.errors import ModelRuntimeError
    from events.errors import IdentityError, LogStoreError

    known = (BusError, ModelRuntimeError, IdentityError, LogStoreError)
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, known) else None


def _default_config() -> Path | None:
    """Return `<Cortex home>/config.yaml`, or print how to create it and return None if it is missing."""
    from cortex.node.home import default_config_path

    path = default_config_path()
    if not path.is_file():
        print(f"error: no --config given and {path} does not exist; run `cortex init` to create it", file=sys.stderr)
        return None
    return path


def apply_log_levels(config: Any) -> None:
    """Set the root logger to `log_level` and the libraries' loggers to `library_log_level`."""
    import logging

    from cortex.node.config import LIBRARY_LOGGERS

    logging.getLogger().setLevel(config.log_level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(config.library_log_level)


def _run_start(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import os

    from cortex.node.config import ConfigError, load_config
    from cortex.node.config_checks import check_paths
    if args.config is None:
        args.config = _default_config()
        if args.config is None:
            return 2
    try:
        config = load_config(args.config, environ=os.environ)
        check_paths(config, str(args.config))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    apply_log_levels(config)
    problem = _check_models(config, args.config)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from cortex.node.lifecycle import NodeRefused
    from cortex.node.node import Node

    status = 0
    try:
        asyncio.run(Node(config).run())
    except NodeRefused as error:
        print(f"error: {error}", file=sys.stderr)
        status = 1
    except Exception as error:  # noqa: BLE001 - known start-up failures become one line
        reason = _startup_error(error)
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
        status = 1
    # NOTE: libp2p can leave a non-daemon thread behind after a clean stop, which would keep
    # the process alive. The node has closed its log and sockets, so it exits without waiting.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run_stop(args: argparse.Namespace) -> int:
    import os

    from cortex.node.config import ConfigError, load_config
    from cortex.node.lifecycle import NodeRefused, signal_node, wait_for_exit

    data_dir = args.data_dir
    if data_dir is None:
        config_path = args.config or _default_config()
        if config_path is None:
            return 2
        try:
            data_dir = load_config(config_path, environ=os.environ).data_dir
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        pid = signal_node(data_dir)
    except NodeRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"sent SIGTERM to node pid {pid} ({data_dir}); waiting for it to exit", flush=True)
    if not wait_for_exit(data_dir, pid, STOP_WAIT_S):
        print(
            f"error: node pid {pid} still runs {STOP_WAIT_S:.0f} s after SIGTERM (it may be finishing requests); "
            f"check again with `cortex node stop --data-dir {data_dir}`, or end it with `kill -KILL {pid}`",
            file=sys.stderr,
        )
        return 1
    print(f"node pid {pid} stopped")
    return 0
