"""Run install.sh in a temporary HOME with the project's virtual environment, as a user would."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)  # the environment running the tests, which has Cortex installed
INSTALL_TIMEOUT_S = 240  # a native start waits up to 120 s for the node to serve
# An unprivileged uid inside a user namespace. Files that root owns on the host appear as its
# own there, and it has no capabilities over the host's files, so permissions apply to it.
NAMESPACE_UID = 1234

Snapshot = dict[str, tuple[int, str]]
# Exits 0 only in a process whose effective capability set is empty.
_NO_CAPABILITIES_CHECK = (
    "import sys; effective = [line.split()[1] for line in open('/proc/self/status') if line.startswith('CapEff')]; "
    "sys.exit(0 if effective == ['0000000000000000'] else 1)"
)


def base_environment(home: Path, **extra: str) -> dict[str, str]:
    """Return an environment with HOME at `home` and no CORTEX_ variables from the caller's shell."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CORTEX_")}
    environment["HOME"] = str(home)
    environment.update(extra)
    return environment


def run_install(
    home: Path, *options: str, environment: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `install.sh --venv <the tests' venv> OPTIONS` with HOME at `home`."""
    command = [*(prefix or []), "bash", str(ROOT / "install.sh"), "--venv", str(VENV), *options]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
        env=environment if environment is not None else base_environment(home),
    )


def snapshot(folder: Path) -> Snapshot:
    """Return path -> (mtime in ns, SHA-256) of every file under `folder`."""
    files: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(path.relative_to(folder))] = (path.stat().st_mtime_ns, digest)
    return files


def write_tool(folder: Path, name: str, body: str) -> Path:
    """Write an executable shell script `name` into `folder` (a stand-in for a real tool)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def path_with(tools: Path) -> str:
    return f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"


@dataclass(frozen=True)
class Unprivileged:
    """How to run a program as an unprivileged user, and which host uids own files for it."""

    prefix: list[str]
    own_uid: int  # files chowned to this host uid belong to the unprivileged user
    other_uid: int | None  # files chowned to this host uid belong to another user; None: cannot chown


def unprivileged() -> Unprivileged:
    """Return how to run install.sh as an unprivileged user.

    As a user other than root, that is this user. As root (CI), it is root without capabilities
    (`setpriv` empties the bounding set, so file permissions apply to it as to any owner), else a
    user namespace that maps uid 1234 to root without capabilities, else `setpriv` to nobody when
    nobody can run this Python.
    """
    if os.geteuid() != 0:
        return Unprivileged([], os.geteuid(), None)
    no_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    if shutil.which("setpriv") and _runs([*no_capabilities, sys.executable, "-c", _NO_CAPABILITIES_CHECK]):
        return Unprivileged(no_capabilities, 0, 65534)
    namespace = ["unshare", "--user", f"--map-user={NAMESPACE_UID}", f"--map-group={NAMESPACE_UID}"]
    if shutil.which("unshare") and _runs([*namespace, sys.executable, "-c", "pass"]):
        return Unprivileged(namespace, 0, 65534)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    if shutil.which("setpriv") and _runs([*nobody, sys.executable, "-c", "pass"]):
        return Unprivileged(nobody, 65534, 0)
    raise RuntimeError(
        "cannot run as an unprivileged user: `unshare --user` failed (user namespaces disabled?) and the user "
        f"nobody cannot run {sys.executable}"
    )


def _runs(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def process_alive(pid: int) -> bool:
    """Return whether `pid` runs and is not a zombie waiting for a parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
