"""The Cortex home folder (`$CORTEX_HOME`, else `~/.cortex`) and clear messages for unwritable folders.

`cortex init` and install.sh put the node's key, `config.yaml`, log, pid and status files in
the home folder. `cortex node start|stop`, `cortex submit`, `cortex status` and `cortex tail`
read `<home>/config.yaml` when no config, bus or log is given.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

HOME_VARIABLE = "CORTEX_HOME"
CONFIG_NAME = "config.yaml"
# Kernel file systems where a process cannot create ordinary folders, even as root.
SPECIAL_FILE_SYSTEMS = frozenset(
    {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs", "configfs", "pstore",
     "bpf", "efivarfs", "fusectl", "mqueue", "binfmt_misc", "autofs", "hugetlbfs", "devtmpfs"}
)
OTHER_FOLDER = f"choose a folder on a disk file system instead (another {HOME_VARIABLE}, or another data_dir)"


def cortex_home(environ: Mapping[str, str] | None = None) -> Path:
    """Return `$CORTEX_HOME` if set and not empty, else `~/.cortex`, as an absolute path.

    An empty or unset HOME falls back to the user's home folder in the password database, so
    the folder never lands in `/.cortex` by accident.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(HOME_VARIABLE, "")
    if value:
        return Path(value).expanduser().absolute()
    user_home = environ.get("HOME") or _password_home()
    return Path(user_home).absolute() / ".cortex"


def _password_home() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:  # a container user without a password entry
        return os.getcwd()


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Return `<home>/config.yaml`, the config `cortex init` writes."""
    return cortex_home(environ) / CONFIG_NAME


def home_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return the data_dir of `<home>/config.yaml` with the `CORTEX_...` overrides of `environ` applied.

    Raises ConfigError if the file is missing (naming `cortex init`) or invalid.
    """
    from cortex.node.config import ConfigError, load_config

    environ = os.environ if environ is None else environ
    path = default_config_path(environ)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run `cortex init` to create it")
    return load_config(path, environ=environ).data_dir


def user_name(uid: int | None = None) -> str:
    """Return the login name of `uid` (this process's user by default), or the number if it has none."""
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def nearest_existing(path: Path) -> Path:
    """Return `path` if it exists, else its nearest existing parent."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def directory_problem(path: Path) -> str | None:
    """Return why this user cannot create or write the folder `path`, with the command that fixes it, or None."""
    existing = nearest_existing(path)
    me = user_name()
    quoted = shlex.quote(str(path))
    if existing == path.absolute() and not existing.is_dir():
        return f"{path} exists but is not a folder; move it away or choose another folder"
    file_system = file_system_type(existing)
    if file_system in SPECIAL_FILE_SYSTEMS:
        return f"{existing} is on the {file_system} kernel file system, where {path} cannot be created or written; {OTHER_FOLDER}"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    owner = user_name(existing.stat().st_uid)
    other_place = f"or set {HOME_VARIABLE} to a folder this user can write"
    if _read_only_file_system(existing):
        return f"{existing} is on a read-only file system, so {path} cannot be written; {other_place}"
    if existing.stat().st_uid == os.geteuid():
        mode = f"{existing.stat().st_mode & 0o777:04o}"
        return (
            f"{existing} is read-only (mode {mode}) for its owner {me}, so {path} cannot be written; run "
            f"`chmod u+w {shlex.quote(str(existing))}` and run this again, {other_place}"
        )
    if existing == path.absolute():
        return (
            f"{path} is owned by {owner} and this user ({me}) cannot write to it; run "
            f"`sudo chown -R {me} {quoted}` and run this again, {other_place}"
        )
    return (
        f"cannot create {path}: {existing} is owned by {owner} and this user ({me}) cannot write to it; run "
        f"`sudo mkdir -p {quoted} && sudo chown {me} {quoted}` and run this again, {other_place}"
    )


def file_system_type(path: Path) -> str | None:
    """Return the type (`ext4`, `proc`, ...) of the file system holding `path`, from /proc/self/mountinfo, or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = str(path.absolute())
    best_point, best_type = "", None
    for line in lines:
        before, separator, after = line.partition(" - ")
        fields = before.split()
        if not separator or len(fields) < 5 or not after:
            continue
        # mountinfo escapes space, tab, newline and backslash in paths as octal (\040).
        point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best_point):
            best_point, best_type = point, after.split()[0]
    return best_type


def _read_only_file_system(path: Path) -> bool:
    try:
        flags = os.statvfs(path).f_flag
    except OSError:
        return False
    return bool(flags & os.ST_RDONLY)


def describe_os_error(error: OSError, path: Path, home: Path) -> str:
    """Return a one-line message for a failed write of `path` inside `home`, naming the fix for permission errors."""
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"could not write {path}: {error.strerror or error}"
    problem = directory_problem(path.parent)
    if problem:
        return problem
    me = user_name()
    existing = nearest_existing(path)
    if existing.stat().st_uid == os.geteuid() or os.access(existing, os.W_OK):
        # The mode bits allow the write, so the file system itself refused it: changing owners cannot help.
        return f"cannot write {path}: {error.strerror or error}, although its mode allows it (a read-only or special file system); {OTHER_FOLDER}"
    owner = user_name(existing.stat().st_uid)
    return (
        f"cannot write {path}: it is owned by {owner} and this user ({me}) may not change it; run "
        f"`sudo chown -R {me} {shlex.quote(str(home))}` and run this again, or set {HOME_VARIABLE} to a folder this user can write"
    )
