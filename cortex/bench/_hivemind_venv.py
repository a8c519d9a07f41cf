"""The separate virtualenv in which `cortex bench peers` runs hivemind, built once and cached.

hivemind pins its own dependency versions, so it gets its own venv instead of Cortex's.
The build runs, in this order:

1. `python -m venv DIR`;
2. `pip install torch==2.13.0`, first: pip then finds hivemind's torch requirement met, where
   a bare `pip install hivemind` resolves torch from the index, which for Linux x86-64 on
   PyPI is a CUDA build of several GB;
3. `pip install hivemind` (its wheel ships the p2pd daemon binary, so nothing is compiled);
4. an import check that records the installed versions in `DIR/cortex-ready.json`.

A venv counts as cached only with that marker, so a build that failed halfway is redone.
pip reads the machine's pip configuration (index, find-links) as usual. The whole build
holds a lock file beside DIR, so two benches never build one venv at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TORCH_REQUIREMENT = "torch==2.13.0"
HIVEMIND_REQUIREMENT = "hivemind"
MARKER_NAME = "cortex-ready.json"
PIP_TIMEOUT_S = 1800.0
IMPORT_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 1500

_VERSION_PROBE = (
    "import json, hivemind, torch; "
    "print(json.dumps({'hivemind': hivemind.__version__, 'torch': torch.__version__}))"
)


class HivemindUnavailable(RuntimeError):
    """hivemind could not be installed or started. The message gives the cause and the fix."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cortex"


def clean_environment() -> dict[str, str]:
    """Return this process's environment without variables that would leak Cortex's venv into another."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


@dataclass(frozen=True)
class HivemindVenv:
    """The hivemind venv at `path`."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.path / MARKER_NAME

    @property
    def log(self) -> Path:
        return self.path.parent / f"{self.path.name}-install.log"

    def cached(self) -> dict[str, Any] | None:
        """Return the recorded versions if the venv was built completely, else None."""
        if not self.python.exists():
            return None
        try:
            versions = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return versions if isinstance(versions, dict) else None

    def ensure(self) -> dict[str, Any]:
        """Return the installed versions, building the venv first if it is not cached.

        Raises HivemindUnavailable with pip's last output lines when a step fails.
        """
        versions = self.cached()
        if versions is not None:
            return versions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f"{self.path.name}.lock", "w", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            versions = self.cached()
            if versions is not None:
                return versions
            return self._build()

    def _build(self) -> dict[str, Any]:
        if self.path.exists():
            if not (self.path / "pyvenv.cfg").exists():
                raise HivemindUnavailable(
                    f"{self.path} exists but is not a virtualenv; remove it or pass another --cache-dir"
                )
            logger.warning("removing the incomplete hivemind venv at %s to build it again", self.path)
            shutil.rmtree(self.path)
        started = time.monotonic()
        print(
            f"building the hivemind venv at {self.path} (once; pip output goes to {self.log}; "
            "this takes minutes, or pass --skip-hivemind)",
            file=sys.stderr,
            flush=True,
        )
        self.log.write_text("", encoding="utf-8")
        self._step("create the venv", [sys.executable, "-m", "venv", str(self.path)])
        self._step(f"pip install {TORCH_REQUIREMENT}", self._pip_install(TORCH_REQUIREMENT))
        self._step(f"pip install {HIVEMIND_REQUIREMENT}", self._pip_install(HIVEMIND_REQUIREMENT))
        probe = self._step("import hivemind", [str(self.python), "-c", _VERSION_PROBE], IMPORT_TIMEOUT_S)
        versions: dict[str, Any] = json.loads(probe.strip().splitlines()[-1])
        if not str(versions.get("torch", "")).startswith(TORCH_REQUIREMENT.split("==")[1]):
            raise HivemindUnavailable(
                f"the hivemind venv at {self.path} has torch {versions.get('torch')}, not {TORCH_REQUIREMENT}; "
                "hivemind's requirements replaced it. Remove the venv and check the pip index"
            )
        versions["build_s"] = round(time.monotonic() - started, 1)
        self.marker.write_text(json.dumps(versions), encoding="utf-8")
        print(f"hivemind venv ready: {versions}", file=sys.stderr, flush=True)
        return versions

    def _pip_install(self, requirement: str) -> list[str]:
        return [str(self.python), "-m", "pip", "install", "--disable-pip-version-check", requirement]

    def _step(self, step: str, argv: list[str], timeout_s: float = PIP_TIMEOUT_S) -> str:
        """Run one build step, append its output to the install log, and return its stdout."""
        logger.info("hivemind venv: %s", step)
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
        try:
            completed = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout_s, env=clean_environment(), check=False
            )
        except subprocess.TimeoutExpired:
            raise HivemindUnavailable(
                f"could not {step}: timed out after {timeout_s:.0f} s; see {self.log}"
            ) from None
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(completed.stdout + completed.stderr + f"(exit status {completed.returncode})\n")
        if completed.returncode != 0:
            tail = (completed.stdout + completed.stderr)[-LOG_TAIL_CHARS:]
            raise HivemindUnavailable(
                f"could not {step} (exit status {completed.returncode}); full output in {self.log}. "
                f"Last lines:\n{tail}"
            )
        return completed.stdout
