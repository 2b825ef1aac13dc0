"""HTML pages of ``modelfactory serve``: the leaderboard (``/`` and ``/leaderboard``).

One section per base model: a scatter plot (perplexity increase vs decode speed-up, or size /
memory ratio with ``?x=size``; one point per build, pass/fail marked, the best passing build
ringed), a second one of KL divergence from fp16 vs size ratio when builds measured it, and a
table of its finished builds (gate ratios, KL divergence, top-1 agreement, task recovery),
passing first, fastest first; then the most recent sweeps, each with its matrix (one row per
configuration, winner ★ and Pareto front ◆ marked). Everything is rendered on the server from the
Jinja2 templates in ``templates/`` (autoescaped): inline SVG and CSS, no script, nothing from a CDN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from markupsafe import Markup

from modelfactory.catalog.records import Board, SweepDetail
from modelfactory.core.errors import CatalogError
from modelfactory.interfaces.server.html import TEMPLATES
from modelfactory.interfaces.server.plot import AXES, KLD_AXES, Point, scatter_svg
from modelfactory.reports.sweep_matrix import SWEEP_TEXT_COLUMNS, sweep_headline, sweep_legend, sweep_matrix

router = APIRouter(tags=["pages"])

TITLE = "modelfactory leaderboard"
BOARD_HEADERS = ("#", "run", "name", "config", "adapters", "ppl +%", "speed-up", "size", "memory", "KL", "top-1 %",
                 "recovery %", "status", "started (UTC)")


def _points(board: Board, x: str, y: str, best_id: str | None) -> list[Point]:
    """One point per build of *board* that measured both RunRow fields *x* and *y*."""
    return [Point(run_id=r.id, label=f"{r.id[:8]} {r.name} {r.config or ''}", x=getattr(r, x), y=getattr(r, y),
                  passed=r.status == "passed", best=r.id == best_id)
            for r in board.rows if getattr(r, x) is not None and getattr(r, y) is not None]


def kld_plot(board: Board, best_id: str | None) -> Markup:
    """Size ratio against KL divergence from fp16, for the builds that measured it ('' when none did)."""
    x, x_label, y, y_label = KLD_AXES
    points = _points(board, x, y, best_id)
    if not points:
        return Markup("")
    return scatter_svg(points, x_label=x_label, y_label=y_label, y_tip="KL {:.4g}", name="kld",
                       title=f"{board.base_uri}: size vs KL divergence")


def _board(board: Board, x: str, best_id: str | None) -> dict[str, Any]:
    """What ``leaderboard.html`` shows of one base model: its plots and finished builds."""
    column, x_label = AXES[x]
    title = f"{board.base_uri} @ {board.base_sha[:12]}"
    return {"board": board, "best_id": best_id, "title": title,
            "shown": f"{len(board.rows)} of {board.runs}" if board.runs > len(board.rows) else f"{board.runs}",
            "ppl_plot": scatter_svg(_points(board, column, "ppl_increase_pct", best_id), x_label=x_label, title=title),
            "kld_plot": kld_plot(board, best_id)}


def _sweep(detail: SweepDetail) -> dict[str, Any]:
    """One sweep: its headline, legend and matrix (the rows of :func:`sweep_matrix`), each row's classes."""
    headers, rows = sweep_matrix(detail)
    return {"detail": detail, "headline": sweep_headline(detail), "legend": sweep_legend(detail), "headers": headers,
            "rows": [(member, " ".join([member.status, *(["winner"] if member.winner else []),
                                        *(["front"] if member.on_front else [])]), list(zip(headers, row, strict=True)))
                     for member, row in zip(detail.members, rows, strict=True)]}


def _page(*, x: str, boards: Sequence[dict[str, Any]] = (), sweeps: Sequence[dict[str, Any]] = (),
          error: str | None = None, status_code: int = 200) -> HTMLResponse:
    html = TEMPLATES.get_template("leaderboard.html").render(
        title=TITLE, x=x, boards=boards, sweeps=sweeps, error=error, board_headers=BOARD_HEADERS,
        text_columns=SWEEP_TEXT_COLUMNS)
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
    from modelfactory.interfaces.server.api import get_catalog, http_status, public_message

    try:
        catalog = get_catalog()
        boards = []
        for board in leaderboard(catalog, base=base, rows=rows):
            best = best_build(catalog, base=board.base_sha, by=x).best
            boards.append(_board(board, x, best.id if best else None))
        recent = [catalog.get_sweep(s.id) for s in catalog.list_sweeps(base=base, limit=sweeps)] if sweeps else []
    except CatalogError as exc:
        return _page(x=x, error=public_message(exc), status_code=http_status(exc))
    return _page(x=x, boards=boards, sweeps=[_sweep(detail) for detail in recent])
