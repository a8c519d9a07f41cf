"""Shared output for benches: the machine record, the table and the JSON object.

Every bench builds a `BenchReport` and calls `emit`. With `--json` the JSON
object goes to stdout and the table to stderr, so stdout holds only JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Goal:
    """A ratio of two figures measured in the same run, with its target."""

    name: str
    value: float
    target: float
    unit: str = "ratio"
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


@dataclass
class BenchReport:
    """Results of one bench run: figures with units in their keys, and goals."""

    bench: str
    results: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "machine": machine_info(),
            "results": self.results,
            "goals": [
                {
                    "name": g.name,
                    "value": round(g.value, 4),
                    "target": g.target,
                    "unit": g.unit,
                    "higher_is_better": g.higher_is_better,
                }
                for g in self.goals
            ],
        }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Describe the machine: CPU model, cores, Python and torch versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        info["torch"] = torch_module.__version__
    return info


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every bench accepts: --json and --quick."""
    parser.add_argument("--json", action="store_true", help="write one JSON object to stdout, the table to stderr")
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in under 20 s (CI smoke)")


def emit(report: BenchReport, as_json: bool) -> int:
    """Print the table (stdout, or stderr with as_json) and the JSON object; return 0."""
    console = Console(stderr=as_json)
    table = Table(title=f"cortex bench {report.bench}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.results.items():
        table.add_row(key, f"{value:,.2f}" if isinstance(value, float) else str(value))
    console.print(table)
    if report.goals:
        goals = Table(title="goals")
        for column in ("goal", "value", "target", "met"):
            goals.add_column(column)
        for g in report.goals:
            sign = ">=" if g.higher_is_better else "<="
            goals.add_row(g.name, f"{g.value:.3f}", f"{sign} {g.target}", "yes" if g.met else "NO")
        console.print(goals)
    if as_json:
        sys.stdout.write(orjson.dumps(report.to_json()).decode() + "\n")
        sys.stdout.flush()
    return 0
