"""Human output of a request timeline, a verification report and a diff of two logs."""

from __future__ import annotations

import collections

from rich.console import Console
from rich.table import Table
from rich.text import Text

from replay.diff import DiffReport, MissingEvent
from replay.render import format_value, key_fields, short_peer_id
from replay.timeline import Timeline
from replay.times import format_duration_ms, format_time_ms
from replay.verify import VerifyReport

MAX_ROWS = 50
"""Rows of missing events and findings printed per section; --json lists more."""


def print_timeline(console: Console, timeline: Timeline) -> None:
    found = "" if timeline.request_found else " (the request event itself is not in this log)"
    console.print(Text(f"request {timeline.request_id}{found}", style="bold"))
    if not timeline.entries:
        console.print("no events of this request in the log")
        return
    console.print(f"{len(timeline.entries)} events over {format_duration_ms(timeline.duration_ms)}"
                  + (" (truncated)" if timeline.truncated else ""))
    table = Table()
    for column in ("#", "gap", "at", "time (UTC)", "author", "type", "served", "fields"):
        table.add_column(column)
    for position, entry in enumerate(timeline.entries):
        event = entry.event
        gap = "" if entry.gap_ms is None else "+" + format_duration_ms(entry.gap_ms)
        table.add_row(
            str(position), Text(gap, style="yellow" if (entry.gap_ms or 0) >= 1000 else ""),
            format_duration_ms(entry.offset_ms), format_time_ms(event.time_ms), short_peer_id(event.author),
            "  " * entry.depth + event.type, format_value(entry.served) if entry.served else "", key_fields(event),
        )
    console.print(table)

    total = sum(timeline.time_by_type.values()) or 1
    by_type = dict(timeline.time_by_type)
    by_author = {short_peer_id(author): spent for author, spent in timeline.time_by_author.items()}
    console.print("where time went (each gap counts for the event that ends it):")
    for heading, column, rows in (("by event type", "event type", by_type), ("by author", "author", by_author)):
        went = Table(title=heading, title_justify="left")
        for name in (column, "time", "share"):
            went.add_column(name)
        for name, spent in rows.items():
            went.add_row(name, format_duration_ms(spent), f"{100 * spent / total:.0f}%")
        console.print(went)

    if timeline.served_by:
        served = Table(title="who served what", title_justify="left")
        served.add_column("author")
        served.add_column("parts")
        for author, parts in sorted(timeline.served_by.items()):
            labels = collections.Counter(part_label(part) for part in parts)
            served.add_row(short_peer_id(author), ", ".join(
                label if count == 1 else f"{label} x{count}" for label, count in labels.items()
            ))
        console.print(served)


_ROLES = {"ExpertInputSent": "input", "ExpertBatchSent": "input", "StageInputSent": "input",
          "ExpertOutputProduced": "output", "ExpertBatchProduced": "output", "StageOutputProduced": "output",
          "RequestAccepted": "on route", "QuorumVoted": "vote", "QuorumDecided": "decision"}


def part_label(part: dict[str, object]) -> str:
    """Name one served part compactly, such as `expert[29][11] output` or `block[0:8] on route`."""
    fields = {key: value for key, value in part.items() if key not in ("type", "step") and value != ""}
    producers = fields.pop("producers", None)
    if "layer" in fields and "expert" in fields:
        where = f"expert[{fields.pop('layer')}][{fields.pop('expert')}]"
    elif "layer" in fields and "experts" in fields:
        # A quorum event lists one expert per compared output, so name each expert once.
        experts = fields.pop("experts")
        listed = sorted(set(experts)) if isinstance(experts, (list, tuple)) else [experts]
        where = f"layer {fields.pop('layer')} expert{'s' if len(listed) != 1 else ''} {','.join(map(str, listed))}"
    elif "start" in fields and "stop" in fields:
        where = f"block[{fields.pop('start')}:{fields.pop('stop')}]"
    else:
        where = " ".join(str(value) for value in fields.values())
        fields = {}
    role = _ROLES.get(str(part.get("type")), str(part.get("type")))
    extra = " ".join(f"{key}={format_value(value)}" for key, value in fields.items())
    if producers is not None:
        extra = " ".join(text for text in (extra, f"of {producers} producer{'s' if producers != 1 else ''}") if text)
    return " ".join(text for text in (where, role, extra) if text)


def print_verify(console: Console, report: VerifyReport) -> None:
    verdict = Text("OK", style="green bold") if report.ok else Text("PROBLEMS FOUND", style="red bold")
    console.print(Text(f"checked {report.events} events by {report.authors} authors, "
                       f"{report.signatures_checked} signatures: "), verdict)
    for kind, count in sorted(report.counts.items()):
        console.print(f"  {kind}: {count}")
    for title, findings, style in (("problems", report.problems, "red"), ("warnings", report.warnings, "yellow")):
        if not findings:
            continue
        console.print(Text(title, style=f"bold {style}"))
        for finding in findings[:MAX_ROWS]:
            where = "" if finding.author is None else f"{short_peer_id(finding.author)} seq {finding.seq}: "
            console.print(Text(f"  {finding.kind}: {where}{finding.message}", style=style))
        if len(findings) > MAX_ROWS:
            console.print(f"  ... {len(findings) - MAX_ROWS} more (--json lists up to 1000 per kind)")


def print_diff(console: Console, report: DiffReport, name_a: str, name_b: str) -> None:
    console.print(f"A: {name_a} ({report.events_a} events)   B: {name_b} ({report.events_b} events)")
    _print_missing(console, f"only in A: {report.only_in_a_count}", report.only_in_a)
    _print_missing(console, f"only in B: {report.only_in_b_count}", report.only_in_b)
    if report.first_event_difference is not None:
        console.print(f"event sequences first differ at index {report.first_event_difference}")
    for name, view in report.views.items():
        if view.first_index is None:
            console.print(Text(f"view {name}: equal at every index, digest {view.final_digest_a}", style="green"))
            continue
        console.print(Text(f"view {name}: first differs after index {view.first_index} "
                           f"(A event {(view.event_a or 'none')[:16]}, B event {(view.event_b or 'none')[:16]})",
                           style="red"))
        same_end = view.final_digest_a == view.final_digest_b
        console.print(f"  final digests: A {view.final_digest_a}, B {view.final_digest_b}"
                      + (" (equal at the end)" if same_end else " (different at the end)"))


def _print_missing(console: Console, title: str, missing: list[MissingEvent]) -> None:
    console.print(Text(title, style="bold"))
    for item in missing[:MAX_ROWS]:
        console.print(f"  index {item.index:>7}  {item.id[:16]}  {short_peer_id(item.author)} #{item.seq:<5} {item.type}")
    if len(missing) > MAX_ROWS:
        console.print(f"  ... {len(missing) - MAX_ROWS} more (--json lists up to 1000)")
