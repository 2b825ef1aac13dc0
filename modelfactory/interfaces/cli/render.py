"""The CLI's output formats of catalog records: Rich tables (``--format table``), CSV and JSON.

Markdown (Prefect artifacts, the model card) lives in :mod:`modelfactory.reports`, HTML in
:mod:`modelfactory.interfaces.server.pages`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from datetime import datetime

from rich.table import Table

from modelfactory.catalog.records import (
    BestBuild,
    Comparison,
    Lineage,
    RunDetail,
    RunRow,
    RunSummary,
    SweepDetail,
    SweepSummary,
)
from modelfactory.reports.cells import adapters_text, number, short
from modelfactory.reports.sweep_matrix import SWEEP_TEXT_COLUMNS, sweep_headline, sweep_legend, sweep_matrix

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


def _status(status: str) -> str:
    style = STATUS_STYLES.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


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
            short(run.error, 60),
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
        table.add_row(name, *map(number, values), unit)
    return table


def _caption(detail: RunDetail) -> str:
    steps = ", ".join(f"{s.name} {_status(s.status)} {_seconds(s.duration_s)}" for s in detail.steps)
    verdicts = {None: "no gate", True: "gate [green]passed[/green]", False: "gate [red]failed[/red]"}
    gate = verdicts[detail.gate_passed]
    failed = [c.message or c.metric for c in detail.gate_checks if not c.passed]
    parts = [f"steps: {steps}" if steps else "no steps", gate + (f" ({'; '.join(failed)})" if failed else "")]
    parts += [f"artifact {a.kind}: {a.uri}" for a in detail.artifacts]
    if detail.error:
        parts.append(f"[red]{detail.error_kind or 'error'}[/red]: {short(detail.error, 200)}")
    return "\n".join(parts)


def runs_json(runs: Sequence[RunSummary | RunDetail]) -> str:
    """The runs as a JSON array (datetimes as ISO 8601 strings)."""
    return json.dumps([run.to_dict() for run in runs], indent=2)


# --------------------------------------------------------------------------- query results

RATIO_HEADERS = (("ppl_increase_pct", "ppl +%"), ("decode_speedup", "speed-up"), ("size_ratio", "size"),
                 ("memory_ratio", "memory"))
#: The verdict's quality measures of a run row (0007), after the ratios.
VERDICT_HEADERS = (("kld_mean", "KL"), ("top1_agreement_pct", "top-1 %"), ("task_recovery_pct", "recovery %"))
ROW_MEASURES = RATIO_HEADERS + VERDICT_HEADERS


def _row_values(row: RunRow) -> list[str]:
    return [row.id[:8], row.name, _status(row.status), row.config or "-",
            row.base_uri or (row.base_sha or "")[:12], adapters_text(row.adapters), _when(row.started_at),
            *(number(getattr(row, name)) for name, _ in ROW_MEASURES)]


def rows_table(rows: Sequence[RunRow], *, title: str = "runs") -> Table:
    """``catalog ls``: one row per run with its config, gate ratios and verdict measures."""
    table = Table(title=title)
    for header in ("id", "name", "status", "config", "base", "adapters", "started (UTC)"):
        table.add_column(header, no_wrap=header in ("id", "started (UTC)"))
    for _, header in ROW_MEASURES:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*_row_values(row))
    return table


#: How ``best`` states the verdict bounds its candidates met.
BOUND_LABELS = {"max_kld": "KL <=", "min_top1": "top-1 >=", "min_task_recovery": "task recovery >="}


def best_table(best: BestBuild) -> Table:
    """``catalog best``: the Pareto front, the best build marked with ★."""
    bound = "any" if best.max_ppl_increase_pct is None else f"<= {best.max_ppl_increase_pct:g}%"
    verdict = "".join(f" · {BOUND_LABELS[name]} {value:g}{'%' if name != 'max_kld' else ''}"
                      for name, value in best.bounds.items())
    table = rows_table(best.front, title=f"best build of {best.base} by {best.by} · ppl increase {bound}{verdict} · "
                       f"{best.candidates} passing candidates, Pareto front:")
    table.columns[0].header = "id"
    if best.best is not None:
        table.caption = f"★ best: {best.best.id} ({best.best.name}, {best.best.config})"
    return table


def comparison_table(comparison: Comparison) -> Table:
    """``catalog compare``: one column per run; changes in % against the first run."""
    runs = comparison.runs
    table = Table(title="compare " + " vs ".join(r.id[:8] for r in runs))
    table.add_column("")
    for run in runs:
        table.add_column(f"{run.id[:8]}\n{run.name}", justify="right")
    table.add_column("unit")
    for label, values in (("status", [_status(r.status) for r in runs]), ("config", [r.config or "-" for r in runs]),
                          ("base", [r.base_uri or "-" for r in runs]),
                          ("adapters", [adapters_text(r.adapters) or "-" for r in runs]),
                          ("gate", [{None: "-", True: "passed", False: "failed"}[r.gate_passed] for r in runs])):
        table.add_row(label, *values, "")
    for metric in comparison.metrics:
        cells = [number(metric.values[0])] + [
            number(v) + (f" ({c:+.1f}%)" if c is not None else "")
            for v, c in zip(metric.values[1:], metric.change_pct[1:], strict=True)]
        table.add_row(f"{metric.name} {metric.side}".strip(), *cells, metric.unit)
    return table


def lineage_table(lineage: Lineage) -> Table:
    """``catalog lineage``: base → adapters → spec → run → artifacts → publications, one link a row."""
    table = Table(title=f"lineage of {lineage.ref} (matched {lineage.matched_by}; run {lineage.run_id}"
                        + (f", {len(lineage.runs)} runs produced it" if len(lineage.runs) > 1 else "") + ")")
    for header in ("link", "ref", "sha", "detail"):
        table.add_column(header, overflow="fold")
    for node in lineage.nodes:
        detail = {k: v for k, v in node.detail.items() if k != "spec" and v is not None}
        table.add_row(node.kind, node.ref, node.sha or "", ", ".join(f"{k}={v}" for k, v in detail.items()))
    return table


# --------------------------------------------------------------------------- CSV


def _csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


ROW_FIELDS = ("id", "name", "status", "config", "bits", "group_size", "desc_act", "base_uri", "base_sha",
              "started_at", "finished_at", *(name for name, _ in ROW_MEASURES))


def rows_csv(rows: Sequence[RunRow], *, extra: Callable[[RunRow], Sequence[object]] | None = None,
             extra_header: Sequence[str] = ()) -> str:
    def values(row: RunRow) -> list[object]:
        base = [v.isoformat() if isinstance(v, datetime) else v for v in (getattr(row, f) for f in ROW_FIELDS)]
        return base + [adapters_text(row.adapters)] + list(extra(row) if extra else [])
    return _csv([*ROW_FIELDS, "adapters", *extra_header], [values(r) for r in rows])


def detail_csv(detail: RunDetail) -> str:
    """``catalog show --format csv``: the run's metrics, one (name, side) a line."""
    return _csv(("run_id", "metric", "side", "value", "unit"),
                [(detail.id, m.name, m.side, m.value, m.unit) for m in detail.metrics])


def comparison_csv(comparison: Comparison) -> str:
    ids = [r.id for r in comparison.runs]
    header = ["metric", "side", "unit", *ids, *(f"change_pct_{i[:8]}" for i in ids[1:])]
    return _csv(header, [(m.name, m.side, m.unit, *m.values, *m.change_pct[1:]) for m in comparison.metrics])


def best_csv(best: BestBuild) -> str:
    best_id = best.best.id if best.best else None
    return rows_csv(best.front, extra=lambda r: [r.id == best_id], extra_header=["best"])


def lineage_csv(lineage: Lineage) -> str:
    return _csv(("link", "ref", "sha", "detail"),
                [(n.kind, n.ref, n.sha, json.dumps(n.detail, default=str)) for n in lineage.nodes])


def record_json(record: object) -> str:
    """Any catalog record (or a list of them) as indented JSON."""
    if isinstance(record, (list, tuple)):
        return json.dumps([r.to_dict() for r in record], indent=2)
    return json.dumps(record.to_dict(), indent=2)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- sweeps


def sweep_table(detail: SweepDetail) -> Table:
    """``catalog show SWEEP``: the matrix, winner ★ and front ◆ marked."""
    headers, rows = sweep_matrix(detail)
    table = Table(title=f"{detail.id} · {sweep_headline(detail)}", caption=sweep_legend(detail)
                  + (f"\n[red]{detail.error_kind or 'error'}[/red]: {short(detail.error, 200)}" if detail.error else ""))
    for header in headers:
        table.add_column(header, justify="left" if header in SWEEP_TEXT_COLUMNS else "right",
                         no_wrap=header == "branch")
    status_at = headers.index("status")
    for row in rows:
        table.add_row(*(_status(cell) if i == status_at else cell for i, cell in enumerate(row)))
    return table


def sweeps_table(sweeps: Sequence[SweepSummary]) -> Table:
    """``catalog sweeps``: one row per sweep, newest first."""
    table = Table(title="sweeps")
    for header in ("id", "name", "status", "objective", "base", "members", "passed", "winner", "created (UTC)",
                   "error"):
        table.add_column(header, no_wrap=header in ("id", "created (UTC)"),
                         justify="right" if header in ("members", "passed") else "left")
    for s in sweeps:
        table.add_row(s.id[:8], s.name, _status(s.status), s.objective, s.base_uri or (s.base_sha or "")[:12],
                      str(s.members), str(s.passed), s.winner_label or "-", _when(s.created_at), short(s.error, 60))
    return table


#: Member fields of ``catalog show SWEEP --format csv`` (task recovery: one ``recovery_<task>`` column each).
SWEEP_CSV_FIELDS = ("run_id", "label", "kernel", "position", "status", "winner", "on_front", "config", "bits",
                    "group_size", "desc_act", "damp_percent", "calibration_samples", "ppl_increase_pct",
                    "size_ratio", "decode_speedup", "memory_ratio", "kld_mean", "kld_p99", "top1_agreement_pct",
                    "hostname", "cuda_visible_devices", "device", "gpu_stage_s")


def sweep_csv(detail: SweepDetail) -> str:
    """``catalog show SWEEP --format csv``: one line per member, every matrix value unformatted."""
    tasks = sorted({task for m in detail.members for task in m.task_recovery_pct})
    return _csv(("sweep_id", *SWEEP_CSV_FIELDS, *(f"recovery_{t}" for t in tasks)),
                [(detail.id, *(getattr(m, f) for f in SWEEP_CSV_FIELDS),
                  *(m.task_recovery_pct.get(t) for t in tasks)) for m in detail.members])


def sweeps_csv(sweeps: Sequence[SweepSummary]) -> str:
    fields = ("id", "name", "status", "objective", "publish_mode", "base_uri", "base_sha", "created_at",
              "finished_at", "members", "passed", "winner_run_id", "winner_label", "error")
    return _csv(fields, [[v.isoformat() if isinstance(v, datetime) else v for v in (getattr(s, f) for f in fields)]
                         for s in sweeps])
