"""Set up a Cortex home folder: identity, hardware detection and config, for `cortex init`.

`set_up_home` never replaces a key file, and replaces `config.yaml` only when asked to
(`force`, which first copies it to `config.yaml.old`). Otherwise a `config.yaml` that differs
from the generated one is kept and the generated text goes to `config.yaml.new`. A file is
written only when its bytes would change, so a second run on the same machine writes nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cortex.node.config import ConfigError, NodeConfig, load_config
from cortex.node.config_checks import DEFAULT_KEY_NAME, is_default_identity, path_problems
from cortex.node.config_template import describe_gpus, render_config
from cortex.node.hardware import Hardware, detect_hardware
from cortex.node.home import CONFIG_NAME, describe_os_error, directory_problem

EXIT_INVALID = 2
EXIT_PERMISSION = 3
LOW_DISK_MB = 2048  # below this, the event log and model files may not fit


class SetupError(Exception):
    """Failure to set up the home folder, with a message that names the command or fix."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass
class SetupReport:
    """Findings and actions of `set_up_home`, printed as lines for the operator."""

    home: Path
    config_path: Path
    hardware: Hardware
    peer_id: str = ""
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        hardware = self.hardware
        return [
            f"Cortex home: {self.home}",
            *self.actions,
            f"peer id: {self.peer_id}",
            f"hardware: {hardware.cpu_cores} CPU cores ({hardware.cpu_model}), {hardware.ram_mb} MiB RAM, "
            f"{hardware.disk_free_mb} MiB free disk",
            f"GPUs: {describe_gpus(hardware)}",
            *(f"warning: {warning}" for warning in self.warnings),
            *command_hints(self.config_path),
        ]


def cortex_command() -> str:
    """Return how to run `cortex` as typed in a shell: `cortex` if PATH finds this one, else its full path.

    install.sh installs into a virtual environment that is not on PATH until activated.
    """
    script = Path(sys.prefix) / "bin" / "cortex"
    on_path = shutil.which("cortex")
    if not script.is_file() or (on_path is not None and os.path.samefile(on_path, script)):
        return "cortex"
    return shlex.quote(str(script))


def command_hints(config_path: Path) -> list[str]:
    """Return the lines that tell how to start and stop the node, with commands runnable as printed."""
    cortex = cortex_command()
    lines = [f"start the node: {cortex} node start --config {shlex.quote(str(config_path))}"]
    lines.append(f"stop it: {cortex} node stop --config {shlex.quote(str(config_path))}")
    if cortex != "cortex":
        activate = Path(cortex).parent / "activate"
        lines.append(f"to type plain `cortex`, activate its virtual environment first: source {shlex.quote(str(activate))}")
    return lines


def set_up_home(home: Path, force: bool = False) -> SetupReport:
    """Create `home`, its config and the node identity; raise SetupError with the fix on failure."""
    problem = directory_problem(home)
    if problem:
        raise SetupError(problem, EXIT_PERMISSION)
    _make_folder(home)
    hardware = detect_hardware(home)
    report = SetupReport(home=home, config_path=home / CONFIG_NAME, hardware=hardware)
    report.actions.append(_write_config(home, render_config(hardware), force))
    config = _load(report.config_path)
    report.peer_id = _ensure_identity(config, home, report)
    problems = path_problems(config)
    if problems:
        listed = "\n".join(f"  {report.config_path}: {problem}" for problem in problems)
        raise SetupError(f"the config names paths this node cannot use:\n{listed}", EXIT_INVALID)
    if hardware.disk_free_mb < LOW_DISK_MB:
        report.warnings.append(
            f"only {hardware.disk_free_mb} MiB free on the file system of {home}; the event log and models need more"
        )
    return report


def _make_folder(home: Path) -> None:
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise SetupError(describe_os_error(error, home, home), EXIT_PERMISSION) from None


def _write_if_changed(path: Path, text: str, home: Path) -> bool:
    """Write `text` to `path` atomically unless it already contains exactly that; return whether it wrote."""
    try:
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return False
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as error:
        raise SetupError(describe_os_error(error, path, home), EXIT_PERMISSION) from None
    return True


def _write_config(home: Path, text: str, force: bool) -> str:
    """Write or keep `config.yaml` and return the line that reports which."""
    config_path = home / CONFIG_NAME
    if not config_path.exists():
        _write_if_changed(config_path, text, home)
        return f"wrote {config_path}"
    try:
        current = config_path.read_text(encoding="utf-8")
    except OSError as error:
        raise SetupError(describe_os_error(error, config_path, home), EXIT_PERMISSION) from None
    if current == text:
        return f"kept {config_path} (it matches this machine)"
    if force:
        old_path = config_path.with_name(CONFIG_NAME + ".old")
        _write_if_changed(old_path, current, home)
        _write_if_changed(config_path, text, home)
        return f"replaced {config_path} with the generated config; the previous one is in {old_path}"
    new_path = config_path.with_name(CONFIG_NAME + ".new")
    _write_if_changed(new_path, text, home)
    return (
        f"kept your {config_path}; the config generated for this machine is in {new_path} "
        f"(compare them with `diff {config_path} {new_path}`, or run `cortex init --force` to replace yours)"
    )


def _load(config_path: Path) -> NodeConfig:
    try:
        return load_config(config_path, environ=os.environ)
    except ConfigError as error:
        raise SetupError(f"{error}\n{_config_fix(error)}", EXIT_INVALID) from None


def _config_fix(error: ConfigError) -> str:
    """Return how to fix `error`: the environment variables that set bad values, or the config file."""
    variables = sorted(set(error.variables))
    in_file = len(variables) < len(str(error).splitlines())
    fixes = []
    if variables:
        fixes.append(f"correct or unset the environment variable{'s' if len(variables) > 1 else ''} {', '.join(variables)}")
    if in_file or not variables:
        fixes.append("fix the key in the config file, or run `cortex init --force` to regenerate the config")
    return "; ".join(fixes)


def _ensure_identity(config: NodeConfig, home: Path, report: SetupReport) -> str:
    """Load the node key, creating it if absent (never replacing one), and return the peer id."""
    from events import Identity
    from events.errors import IdentityError

    key_path = config.identity_path
    existed = key_path.exists()
    if not existed and not is_default_identity(config) and key_path != home / DEFAULT_KEY_NAME:
        # The config names a key file elsewhere: creating it would hide a mistyped path.
        mistyped = next(line for line in path_problems(config) if line.startswith("identity ="))
        raise SetupError(f"{home / CONFIG_NAME}: {mistyped}", EXIT_INVALID)
    if not existed:
        problem = directory_problem(key_path.parent)
        if problem:
            raise SetupError(problem, EXIT_PERMISSION)
    try:
        identity = Identity.load(key_path) if existed else Identity.load_or_create(key_path)
    except IdentityError as error:
        raise SetupError(str(error), EXIT_INVALID) from None
    except OSError as error:
        raise SetupError(describe_os_error(error, key_path, home), EXIT_PERMISSION) from None
    report.actions.append(f"{'kept the existing' if existed else 'created a new'} node key {key_path}")
    return identity.peer_id
