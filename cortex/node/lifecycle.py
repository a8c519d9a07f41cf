"""Process-level pieces of a node: pid files, the status file and refusal errors."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import orjson

# Re-exported: node.py imports hardware_summary from here.
from cortex.node.hardware import hardware_summary as hardware_summary


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
    return True


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
