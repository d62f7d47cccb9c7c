"""Reading JSON-lines trace exports: a terminal waterfall and Chrome trace-event JSON.

``streamwise trace view PATH`` prints each trace as an indented waterfall;
``streamwise trace export PATH --format chrome -o out.json`` writes a file that
Perfetto and chrome://tracing open. PATH is a .jsonl file or a directory of them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from streamwise.exceptions import UsageError


@dataclasses.dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    record: dict[str, Any]

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_dir():
        return sorted(path.glob("*.jsonl"))
    if path.exists():
        return [path]
    raise UsageError(f"no trace export at {path}")


def load(path: str | pathlib.Path) -> list[Span]:
    """Every span in the JSON-lines export at ``path`` (file or directory)."""
    found = []
    for file in _files(pathlib.Path(path)):
        for line in file.read_bytes().splitlines():
            if not line.strip():
                continue
            r = orjson.loads(line)
            resource = r.get("resource", {})
            service = resource.get("streamwise.deployment") or resource.get("service.name", "?")
            found.append(
                Span(
                    r["trace_id"], r["span_id"], r.get("parent_id"), r["name"], service,
                    r["start_ns"], r["end_ns"], r.get("status", "UNSET"), r,
                )
            )
    return found


def traces(spans: Iterable[Span], trace_id: str | None = None, min_duration_ms: float = 0.0) -> dict[str, list[Span]]:
    """Spans grouped by trace, oldest trace first; filtered by id and root duration."""
    grouped: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        if trace_id is None or span.trace_id.startswith(trace_id):
            grouped[span.trace_id].append(span)
    kept = {}
    for tid, members in sorted(grouped.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        start = min(s.start_ns for s in members)
        end = max(s.end_ns for s in members)
        if (end - start) / 1e6 >= min_duration_ms:
            kept[tid] = sorted(members, key=lambda s: s.start_ns)
    return kept


def _walk(members: list[Span]) -> Iterator[tuple[int, Span]]:
    ids = {s.span_id for s in members}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in members:
        parent = span.parent_id if span.parent_id in ids else None
        children[parent].append(span)

    def visit(parent: str | None, depth: int) -> Iterator[tuple[int, Span]]:
        for span in children.get(parent, []):
            yield depth, span
            yield from visit(span.span_id, depth + 1)

    yield from visit(None, 0)


def waterfall(grouped: dict[str, list[Span]]) -> str:
    """Each trace as an indented tree: service, span, start offset, duration, status."""
    lines = []
    for tid, members in grouped.items():
        start = min(s.start_ns for s in members)
        total = (max(s.end_ns for s in members) - start) / 1e6
        lines.append(f"trace {tid}  {len(members)} spans  {total:.2f} ms")
        for depth, span in _walk(members):
            label = f"{'  ' * depth}{span.name}"
            status = "" if span.status == "UNSET" else span.status
            lines.append(
                f"  {span.service[:18]:<18} {label[:60]:<60} +{(span.start_ns - start) / 1e6:9.2f} ms "
                f"{span.duration_ms:9.2f} ms  {status}".rstrip()
            )
        lines.append("")
    return "\n".join(lines)


def chrome_trace(grouped: dict[str, list[Span]]) -> dict[str, Any]:
    """Chrome trace-event JSON: one complete ("X") event per span, a process per service."""
    services = sorted({s.service for members in grouped.values() for s in members})
    pid = {name: i + 1 for i, name in enumerate(services)}
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid[name], "tid": 0, "args": {"name": name}} for name in services
    ]
    for members in grouped.values():
        for span in members:
            events.append(
                {
                    "name": span.name,
                    "cat": span.service,
                    "ph": "X",
                    "ts": span.start_ns / 1000,
                    "dur": max(span.end_ns - span.start_ns, 0) / 1000,
                    "pid": pid[span.service],
                    "tid": int(span.trace_id[-6:], 16),
                    "args": {
                        "trace_id": span.trace_id,
                        "span_id": span.span_id,
                        "parent_id": span.parent_id,
                        "status": span.status,
                        **{k: v for k, v in span.record.get("attributes", {}).items()},
                    },
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}
