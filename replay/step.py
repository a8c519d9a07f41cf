"""Step mode: fold a log one event at a time and show how each event changed the views.

Commands are read one per line, from the terminal or from a pipe (which is how tests drive
it):

    (empty line), n, next [N]   fold the next event (or N events) and show each view change
    u, until INDEX              fold up to and including the event at INDEX
    c, continue                 fold to the end of the log
    v, view [NAME]              show the current views (or one of them)
    d, digest                   show each view's digest
    h, help, ?                  list the commands
    q, quit                     stop (so does the end of input)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from replay.fold import Folder, FoldStep
from replay.labels import label_change
from replay.render import event_line, format_value
from replay.tables import view_tables
from replay.views import view_digest, view_json

MAX_CHANGES_SHOWN = 20
HELP = __doc__.split("\n\n", 2)[2].rstrip() if __doc__ else ""


def json_changes(before: Any, after: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (path, old, new) for every leaf that differs between two JSON values."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            child = f"{path}.{key}" if path else str(key)
            if key not in before:
                yield child, None, after[key]
            elif key not in after:
                yield child, before[key], None
            else:
                yield from json_changes(before[key], after[key], child)
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for position, (old, new) in enumerate(zip(before, after)):
            yield from json_changes(old, new, f"{path}[{position}]")
    elif before != after:
        yield path, before, after


class Stepper:
    """Runs step-mode commands against one Folder and prints to one console."""

    def __init__(self, folder: Folder, console: Console) -> None:
        self.folder = folder
        self.console = console
        self._json = {name: view_json(view) for name, view in folder.views.items()}

    def run(self, commands: TextIO, prompt: bool) -> None:
        self.console.print(Text(f"step mode: {self.folder.reader.count()} events; h for help", style="dim"))
        while True:
            if prompt:
                self.console.print(Text(f"[{self.folder.index + 1}]> ", style="bold"), end="")
            line = commands.readline()
            if not line:
                return
            if not self.execute(line.strip()):
                return

    def execute(self, line: str) -> bool:
        """Run one command; return False to stop."""
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command in ("", "n", "next"):
            self._advance(count=int(argument) if argument.isdigit() else 1)
        elif command in ("u", "until") and argument.isdigit():
            self._advance(until_index=int(argument))
        elif command in ("c", "continue"):
            self._advance()
        elif command in ("v", "view"):
            self._show_views(argument or None)
        elif command in ("d", "digest"):
            for name, view in self.folder.views.items():
                self.console.print(f"{name}: {view_digest(view)}")
        elif command in ("q", "quit", "exit"):
            return False
        elif command in ("h", "help", "?"):
            self.console.print(HELP)
        else:
            self.console.print(Text(f"unknown command {line!r}; h lists the commands", style="red"))
        return True

    def _advance(self, count: int | None = None, until_index: int | None = None) -> None:
        """Fold `count` events showing each change, or fold silently up to `until_index` or the end."""
        show_each = count is not None
        stepped = 0
        while (count is None or stepped < count) and (until_index is None or self.folder.index < until_index):
            step = self.folder.step()
            if step is None:
                self.console.print(Text(f"end of log after {self.folder.index + 1} events", style="dim"))
                break
            stepped += 1
            if show_each:
                self._show_step(step)
        if not show_each:
            self.console.print(Text(f"at index {self.folder.index} ({stepped} events folded)", style="dim"))
            self._json = {name: view_json(view) for name, view in self.folder.views.items()}

    def _show_step(self, step: FoldStep) -> None:
        marker = "" if step.applied else "  (not applied: its author equivocated before it)"
        self.console.print(event_line(step.event, prefix=f"{step.index:>6}  "), Text(marker, style="yellow"))
        if step.refolded:
            self.console.print(Text("  equivocation completed: views refolded without the author's later events", style="yellow"))
        for name, view in self.folder.views.items():
            after = view_json(view)
            changes = list(json_changes(self._json[name], after))
            self._json[name] = after
            if not changes:
                self.console.print(Text(f"  {name}: unchanged", style="dim"))
                continue
            self.console.print(Text(f"  {name}: {len(changes)} change(s)", style="bold"))
            for change in changes[:MAX_CHANGES_SHOWN]:
                path, old, new = label_change(name, *change)
                self.console.print(f"    {path}: {_brief(old)} -> {_brief(new)}")
            if len(changes) > MAX_CHANGES_SHOWN:
                self.console.print(f"    ... {len(changes) - MAX_CHANGES_SHOWN} more")

    def _show_views(self, name: str | None) -> None:
        now_ms = self.folder.now_ms or 0
        for view_name, view in self.folder.views.items():
            if name is None or name == view_name:
                for renderable in view_tables(view_name, view, now_ms, view_digest(view)):
                    self.console.print(renderable)


def _brief(value: Any) -> str:
    return "(none)" if value is None else format_value(value)
