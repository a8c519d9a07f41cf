"""Process-level pieces of a node: pid files, the status file and refusal errors."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

# Re-exported: node.py imports hardware_summary from here.
from cortex.node.hardware import hardware_summary as hardware_summary

if TYPE_CHECKING:
    from cortex.node.config import NodeConfig

logger = logging.getLogger(__name__)
STOP_WAIT_S = 30.0  # how long `cortex node stop` waits for the node to exit


class NodeRefused(Exception):
    """The node may not start or join: a live twin, another protocol major, a bad setting."""


STATUS_FILE_NAME = "node.status.json"


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """Return the status the node of `data_dir` last wrote, or None if there is none or it is unreadable."""
    try:
        status: dict[str, Any] = orjson.loads((data_dir / STATUS_FILE_NAME).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return status


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Return whether `pid` has exited but its parent has not collected it yet (Linux /proc; False elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in brackets and may itself contain spaces.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def read_pid_file(path: Path) -> int | None:
    """Return the pid in `path` if that process is alive, else None."""
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_running(pid) else None


def check_pid_file(path: Path) -> None:
    """Raise NodeRefused if a live process already runs a node from this data directory."""
    pid = read_pid_file(path)
    if pid is not None and pid != os.getpid():
        raise NodeRefused(
            f"a node (pid {pid}) already runs from {path.parent}; stop it with "
            f"`cortex node stop --data-dir {path.parent}` or use another data_dir"
        )


def write_pid_file(path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{os.getpid()}\n")
    temporary.replace(path)


def remove_pid_file(path: Path) -> None:
    if read_pid_file(path) in (None, os.getpid()):
        path.unlink(missing_ok=True)


def signal_node(data_dir: Path, signum: int = signal.SIGTERM) -> int:
    """Send `signum` to the node running from `data_dir` and return its pid; raise NodeRefused if none runs."""
    pid = read_pid_file(data_dir / "node.pid")
    if pid is None:
        raise NodeRefused(f"no running node found for data directory {data_dir} (no live pid in {data_dir / 'node.pid'})")
    os.kill(pid, signum)
    return pid


def prepare_data_dir(config: NodeConfig) -> None:
    """Create the data folder and raise NodeRefused if a node already runs from it, before the log is opened.

    A refused second node must not touch the running node's log. A node without models is
    allowed (it relays and routes) but serves nothing, so that is logged as a warning.
    """
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NodeRefused(
            f"data_dir = '{config.data_dir}' could not be created: {error.strerror or error}; set data_dir "
            "(or CORTEX_DATA_DIR) to a folder this user can write on a disk file system"
        ) from None
    check_pid_file(config.pid_path)
    if not config.models:
        logger.warning(
            "this node serves no model because its config has no models entry; add one under the key `models` "
            "(such as `- path: package:demo_model`) or set CORTEX_MODELS"
        )


def wait_for_exit(data_dir: Path, pid: int, timeout_s: float = STOP_WAIT_S, poll_s: float = 0.1) -> bool:
    """Wait until process `pid` is gone and the status state is no longer serving; return False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = read_status(data_dir)
        if not _is_running(pid) and (status is None or status.get("state") != "serving"):
            return True
        time.sleep(poll_s)
    return False
