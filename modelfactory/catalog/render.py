"""Rich tables and JSON for ``modelfactory catalog ls`` / ``show``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from rich.table import Table

from modelfactory.catalog.records import RunDetail, RunSummary

STATUS_STYLES = {
    "running": "cyan",
    "passed": "green",
    "ok": "green",
    "reused": "blue",
    "failed": "red",
    "rejected": "yellow",
}


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _status(status: str) -> str:
    style = STATUS_STYLES.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _short(text: str | None, width: int) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def runs_table(runs: Sequence[RunSummary]) -> Table:
    """One row per run: id, name, status, base model, start (UTC), duration, error."""
    table = Table(title="runs", show_lines=False)
    for header in ("id", "name", "status", "base", "started (UTC)", "took", "error"):
        table.add_column(header, no_wrap=header in ("id", "started (UTC)"))
    for run in runs:
        base = run.base_uri or (run.base_sha or "")[:12]
        table.add_row(
            run.id[:8],
            run.name,
            _status(run.status),
            base,
            _when(run.started_at),
            _seconds(run.duration_s),
            _short(run.error, 60),
        )
    return table


def run_detail_table(detail: RunDetail) -> Table:
    """Metrics of one run, fp16 and gptq side by side (the title and caption sum up the run).

    Metrics that belong to neither model (side ``''``) get a ``value`` column of their own.
    """
    title = f"run {detail.id} · {detail.name} · {_status(detail.status)}"
    table = Table(title=title, caption=_caption(detail))
    sides = ["fp16", "gptq", "delta"] + ([""] if any(m.side == "" for m in detail.metrics) else [])
    table.add_column("metric")
    for side in sides:
        table.add_column(side or "value", justify="right")
    table.add_column("unit")
    by_key = {(m.name, m.side): m for m in detail.metrics}
    for name in dict.fromkeys(m.name for m in detail.metrics):  # first-seen order
        unit = next(m.unit for m in detail.metrics if m.name == name)
        values = [by_key[(name, side)].value if (name, side) in by_key else None for side in sides]
        table.add_row(name, *map(_number, values), unit)
    return table


def _caption(detail: RunDetail) -> str:
    steps = ", ".join(f"{s.name} {_status(s.status)} {_seconds(s.duration_s)}" for s in detail.steps)
    verdicts = {None: "no gate", True: "gate [green]passed[/green]", False: "gate [red]failed[/red]"}
    gate = verdicts[detail.gate_passed]
    failed = [c.message or c.metric for c in detail.gate_checks if not c.passed]
    parts = [f"steps: {steps}" if steps else "no steps", gate + (f" ({'; '.join(failed)})" if failed else "")]
    parts += [f"artifact {a.kind}: {a.uri}" for a in detail.artifacts]
    if detail.error:
        parts.append(f"[red]{detail.error_kind or 'error'}[/red]: {_short(detail.error, 200)}")
    return "\n".join(parts)


def runs_json(runs: Sequence[RunSummary | RunDetail]) -> str:
    """The runs as a JSON array (datetimes as ISO 8601 strings)."""
    return json.dumps([run.to_dict() for run in runs], indent=2)
