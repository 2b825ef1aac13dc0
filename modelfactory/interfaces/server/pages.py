"""HTML pages of ``modelfactory serve``: the leaderboard (``/`` and ``/leaderboard``).

One section per base model: a scatter plot (perplexity increase vs decode speed-up, or size /
memory ratio with ``?x=size``; one point per build, pass/fail marked, the best passing build
ringed), a second one of KL divergence from fp16 vs size ratio when builds measured it, and a
table of its finished builds (gate ratios, KL divergence, top-1 agreement, task recovery),
passing first, fastest first; then the most recent sweeps, each with its matrix (one row per
configuration, winner ★ and Pareto front ◆ marked). Everything is rendered on the server: inline
SVG and CSS, no script, nothing from a CDN.
"""

from __future__ import annotations

from html import escape
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from modelfactory.catalog.records import Board, RunRow, SweepDetail
from modelfactory.catalog.render import (
    SWEEP_TEXT_COLUMNS,
    sweep_headline,
    sweep_legend,
    sweep_matrix,
)
from modelfactory.core.errors import CatalogError
from modelfactory.interfaces.server.plot import AXES, KLD_AXES, Point, scatter_svg

router = APIRouter(tags=["pages"])

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}code{font-size:.9em}
table{border-collapse:collapse;margin-top:12px;font-size:.9em}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}td.num{text-align:right}
tr.passed td.status{color:#2e7d32}tr.rejected td.status{color:#c62828}tr.best{background:#fff8e1}
.legend span{margin-right:16px}.muted{color:#777}svg text{font-size:11px;fill:#444}
nav a{margin-right:12px}tr.winner{background:#fff8e1;font-weight:600}tr.front td:first-child{color:#1565c0}
h3{font-size:1em;margin-top:1.5em}
"""


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "–" if value is None else format(value, fmt)


def _row_html(rank: int, row: RunRow, best_id: str | None) -> str:
    adapters = ", ".join(escape(str(a.get("uri", ""))) for a in row.adapters) or "–"
    classes = f"{row.status}{' best' if row.id == best_id else ''}"
    return (f'<tr class="{classes}" data-run="{escape(row.id)}"><td class="num">{rank}</td>'
            f'<td><a href="/api/runs/{escape(row.id)}"><code>{escape(row.id[:8])}</code></a>'
            f'{" ★" if row.id == best_id else ""}</td>'
            f"<td>{escape(row.name)}</td><td>{escape(row.config or '–')}</td><td>{adapters}</td>"
            f'<td class="num">{_num(row.ppl_increase_pct)}</td><td class="num">{_num(row.decode_speedup)}</td>'
            f'<td class="num">{_num(row.size_ratio)}</td><td class="num">{_num(row.memory_ratio)}</td>'
            f'<td class="num">{_num(row.kld_mean)}</td><td class="num">{_num(row.top1_agreement_pct, ".4g")}</td>'
            f'<td class="num">{_num(row.task_recovery_pct, ".4g")}</td>'
            f'<td class="status">{escape(row.status)}</td>'
            f'<td>{row.started_at.strftime("%Y-%m-%d %H:%M")}</td></tr>')


def _points(board: Board, x: str, y: str, best_id: str | None) -> list[Point]:
    """One point per build of *board* that measured both RunRow fields *x* and *y*."""
    return [Point(run_id=r.id, label=f"{r.id[:8]} {r.name} {r.config or ''}", x=getattr(r, x), y=getattr(r, y),
                  passed=r.status == "passed", best=r.id == best_id)
            for r in board.rows if getattr(r, x) is not None and getattr(r, y) is not None]


def kld_plot(board: Board, best_id: str | None) -> str:
    """Size ratio against KL divergence from fp16, for the builds that measured it ('' when none did)."""
    x, x_label, y, y_label = KLD_AXES
    points = _points(board, x, y, best_id)
    if not points:
        return ""
    return scatter_svg(points, x_label=x_label, y_label=y_label, y_tip="KL {:.4g}", name="kld",
                       title=f"{board.base_uri}: size vs KL divergence")


def _board_html(board: Board, x: str, best_id: str | None) -> str:
    column, x_label = AXES[x]
    points = _points(board, column, "ppl_increase_pct", best_id)
    title = f"{board.base_uri} @ {board.base_sha[:12]}"
    header = "".join(f"<th>{h}</th>" for h in ("#", "run", "name", "config", "adapters", "ppl +%", "speed-up",
                                               "size", "memory", "KL", "top-1 %", "recovery %", "status",
                                               "started (UTC)"))
    rows = "".join(_row_html(i, row, best_id) for i, row in enumerate(board.rows, start=1))
    shown = f"{len(board.rows)} of {board.runs}" if board.runs > len(board.rows) else f"{board.runs}"
    return (f'<section class="board" data-base="{escape(board.base_uri)}"><h2>{escape(title)}</h2>'
            f'<p class="muted">{shown} finished builds; ★ = best passing build by {escape(x)}</p>'
            f'<p class="legend"><span style="color:#2e7d32">● passed</span>'
            f'<span style="color:#c62828">✕ rejected</span><span style="color:#f9a825">◯ best</span></p>'
            f'{scatter_svg(points, x_label=x_label, title=title)}{kld_plot(board, best_id)}'
            f'<table class="leaderboard"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></section>')


def _sweep_html(detail: SweepDetail) -> str:
    """One sweep: its headline, legend and matrix (the rows of :func:`sweep_matrix`), winner highlighted."""
    headers, rows = sweep_matrix(detail)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for member, row in zip(detail.members, rows, strict=True):
        classes = " ".join([member.status, *(["winner"] if member.winner else []),
                            *(["front"] if member.on_front else [])])
        cells = []
        for header, cell in zip(headers, row, strict=True):
            text = escape(cell)
            if header == "branch":
                text = f'<a href="/api/runs/{escape(member.run_id)}"><code>{text}</code></a>'
            css = "status" if header == "status" else ("" if header in SWEEP_TEXT_COLUMNS else "num")
            cells.append(f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>")
        body.append(f'<tr class="{classes}" data-run="{escape(member.run_id)}">{"".join(cells)}</tr>')
    error = f'<p class="error">{escape(detail.error)}</p>' if detail.error else ""
    return (f'<article class="sweep" data-sweep="{escape(detail.id)}">'
            f'<h3><a href="/api/sweeps/{escape(detail.id)}"><code>{escape(detail.id[:8])}</code></a> '
            f'{escape(sweep_headline(detail))}</h3>'
            f'<p class="muted">base {escape(detail.base_uri or "not resolved")} · {escape(sweep_legend(detail))}</p>'
            f'{error}<table class="sweep-matrix"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f"</table></article>")


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>'
            f'<nav><a href="/leaderboard?x=speed">by speed-up</a><a href="/leaderboard?x=size">by size</a>'
            f'<a href="/leaderboard?x=memory">by memory</a><a href="/docs">API</a></nav>{body}</body></html>')
    return HTMLResponse(html, status_code=status_code)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/leaderboard", response_class=HTMLResponse)
def leaderboard_page(
    base: str | None = None,
    x: Annotated[str, Query(pattern="^(speed|size|memory)$")] = "speed",
    rows: Annotated[int, Query(ge=1, le=1000)] = 100,
    sweeps: Annotated[int, Query(ge=0, le=50)] = 5,
) -> HTMLResponse:
    """Leaderboard per base model with a perplexity-increase plot, then the *sweeps* most recent sweeps."""
    from modelfactory.catalog.queries import best_build, leaderboard
    from modelfactory.interfaces.server.api import get_catalog, http_status

    try:
        catalog = get_catalog()
        boards = leaderboard(catalog, base=base, rows=rows)
        sections = []
        for board in boards:
            best = best_build(catalog, base=board.base_sha, by=x).best
            sections.append(_board_html(board, x, best.id if best else None))
        recent = [catalog.get_sweep(s.id) for s in catalog.list_sweeps(base=base, limit=sweeps)] if sweeps else []
        if recent:
            sections.append('<section class="sweeps"><h2>Recent sweeps</h2>'
                            + "".join(_sweep_html(detail) for detail in recent) + "</section>")
    except CatalogError as exc:
        return _page("modelfactory leaderboard", f'<p class="error">{escape(exc.message)}</p>', http_status(exc))
    body = "".join(sections) or '<p class="empty">No finished builds in the catalog yet: run `modelfactory run`.</p>'
    return _page("modelfactory leaderboard", body)
