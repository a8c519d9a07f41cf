"""Child processes of a bench: each in its own process group, read line by line, always stopped.

A child reports to the bench by printing JSON objects, one per line, on stdout. Its stderr
goes to a file, whose last lines go into the error when the child fails. Stopping a child closes its stdin (the polite
request every bench child obeys), then sends SIGTERM and, if needed, SIGKILL to its whole
process group, so helpers it forked (hivemind's p2pd daemon and pool processes) stop too.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

GRACEFUL_STOP_S = 10.0
FORCED_STOP_S = 5.0
STDERR_TAIL_CHARS = 2000


class ChildFailed(RuntimeError):
    """A child process exited, or did not report in time, before it printed what the bench expected."""


class Child:
    """One started child process."""

    def __init__(
        self, name: str, process: subprocess.Popen[bytes], stderr_path: Path, graceful_stop_s: float = GRACEFUL_STOP_S
    ) -> None:
        self.name = name
        self.process = process
        self.stderr_path = stderr_path
        self.graceful_stop_s = graceful_stop_s
        self._buffer = bytearray()

    def read_json(self, key: str, timeout_s: float) -> dict[str, Any]:
        """Return the next JSON object line from stdout that has `key`; skip other lines.

        Raises ChildFailed when the child exits first or `timeout_s` passes.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._read_line(deadline, key, timeout_s)
            try:
                message = json.loads(line)
            except ValueError:
                logger.debug("%s printed a line that is not JSON: %.200s", self.name, line)
                continue
            if isinstance(message, dict) and key in message:
                return message

    def _read_line(self, deadline: float, key: str, timeout_s: float) -> str:
        assert self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(f"{self.name} timed out: no {key!r} report within {timeout_s:.0f} s. {self.stderr_tail()}")
            readable, _, _ = select.select([descriptor], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(descriptor, 65536)
            if not chunk:
                code = self.process.wait(timeout=FORCED_STOP_S)
                raise ChildFailed(f"{self.name} exited with status {code} before reporting {key!r}. {self.stderr_tail()}")
            self._buffer.extend(chunk)
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode("utf-8", "replace")

    def send_line(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        """Ask the child to stop: every bench child exits when its stdin closes."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass

    def stderr_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"(its stderr file {self.stderr_path} is unreadable)"
        return f"Last lines of its stderr:\n{text[-STDERR_TAIL_CHARS:]}" if text else "(its stderr is empty)"

    def stop(self) -> None:
        """Close stdin, wait, then SIGTERM and SIGKILL the process group; return once it is gone."""
        self.close_stdin()
        try:
            self.process.wait(timeout=self.graceful_stop_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.1f s of closing its stdin; sending SIGTERM", self.name, self.graceful_stop_s)
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.graceful_stop_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.1f s; sending SIGKILL", self.name, self.graceful_stop_s)
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=FORCED_STOP_S)
        # Processes the child forked may outlive it in its process group, so they are killed too.
        self._signal_group(signal.SIGKILL)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def _signal_group(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class ChildProcesses:
    """The children a bench started; `with` stops every one of them on exit."""

    def __init__(self, log_dir: Path, graceful_stop_s: float = GRACEFUL_STOP_S) -> None:
        self.log_dir = log_dir
        self.graceful_stop_s = graceful_stop_s
        self._children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Start `argv` in a new session (its own process group) with piped stdin and stdout."""
        stderr_path = self.log_dir / f"{name}.stderr"
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                start_new_session=True,
            )
        child = Child(name, process, stderr_path, self.graceful_stop_s)
        self._children.append(child)
        logger.debug("started %s as pid %d: %s", name, process.pid, " ".join(argv))
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """Stop every child: all stdins closed first, so they shut down in parallel."""
        for child in self._children:
            child.close_stdin()
        while self._children:
            child = self._children.pop()
            try:
                child.stop()
            except (OSError, subprocess.SubprocessError):
                logger.exception("could not stop %s (pid %d)", child.name, child.process.pid)

    def __enter__(self) -> ChildProcesses:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop_all()
