"""A sweep's matrix: one row per configuration, the winner ★ and the Pareto front ◆ marked.

:func:`sweep_matrix` gives the headers and text cells that every rendering uses (the CLI's table,
the leaderboard page, and :func:`sweep_matrix_markdown` for the model card and the Prefect artifact).
"""

from __future__ import annotations

from collections.abc import Callable

from modelfactory.catalog.records import SweepDetail, SweepMemberRow
from modelfactory.reports.cells import md_cell, number, short

#: What each objective prefers among the passing configurations (``core.sweep_spec.Objective``).
OBJECTIVE_WORDS = {
    "size": "smallest on disk",
    "speed": "fastest decode at batch 1",
    "memory": "least memory after load",
    "quality": "closest to fp16 (lowest KL divergence)",
}
WINNER_MARK, FRONT_MARK = "★", "◆"
#: Matrix columns of text (left-aligned); the others are numbers.
SWEEP_TEXT_COLUMNS = frozenset({"", "branch", "kernel", "act-order", "status", "GPU"})


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _gpu(member: SweepMemberRow) -> str:
    """Where the member's GPU stage ran: ``host · GPU 0`` (``-``: in the factory process)."""
    if member.hostname is None and member.cuda_visible_devices is None:
        return member.device or "-"
    gpus = f" · GPU {member.cuda_visible_devices}" if member.cuda_visible_devices is not None else ""
    return f"{member.hostname or '?'}{gpus}"


def sweep_matrix(detail: SweepDetail) -> tuple[list[str], list[list[str]]]:
    """The sweep's matrix as headers and text cells, one row per member in declaration order.

    The first column marks the winner (★) and the Pareto front (◆). Quality columns beyond the
    gate ratios (KL divergence, top-1 agreement, task recovery per task) and the GPU column appear
    only when some member has them. Every rendering (terminal, Markdown, HTML) uses this.
    """
    members = detail.members
    tasks = sorted({task for m in members for task in m.task_recovery_pct})
    columns: list[tuple[str, Callable[[SweepMemberRow], str]]] = [
        ("", lambda m: (WINNER_MARK if m.winner else "") + (FRONT_MARK if m.on_front else "")),
        ("branch", lambda m: m.label),
        ("kernel", lambda m: m.kernel),
        ("bits", lambda m: "-" if m.bits is None else str(m.bits)),
        ("group", lambda m: "-" if m.group_size is None else str(m.group_size)),
        ("act-order", lambda m: _flag(m.desc_act)),
        ("damp", lambda m: number(m.damp_percent)),
        ("calib", lambda m: "-" if m.calibration_samples is None else str(m.calibration_samples)),
        ("status", lambda m: m.status),
        ("ppl +%", lambda m: number(m.ppl_increase_pct)),
        ("size", lambda m: number(m.size_ratio)),
        ("speed-up", lambda m: number(m.decode_speedup)),
    ]
    optional: list[tuple[str, Callable[[SweepMemberRow], float | None]]] = [
        ("KL mean", lambda m: m.kld_mean), ("KL p99", lambda m: m.kld_p99),
        ("top-1 %", lambda m: m.top1_agreement_pct),
        *((f"{task} recovery %", lambda m, t=task: m.task_recovery_pct.get(t)) for task in tasks),
    ]
    columns += [(header, lambda m, get=get: number(get(m))) for header, get in optional
                if any(get(m) is not None for m in members)]
    if any(_gpu(m) != "-" for m in members):
        columns.append(("GPU", _gpu))
    return [header for header, _ in columns], [[cell(m) for _, cell in columns] for m in members]


def sweep_headline(detail: SweepDetail) -> str:
    winner = detail.winner
    verdict = (f"winner {winner.label}" if winner is not None
               else "no winner (no configuration passed)" if detail.status == "finished"
               else "no winner yet" if detail.status == "running" else "no winner")
    return (f"sweep {detail.name} · {detail.status} · {len(detail.members)} configurations · "
            f"objective {detail.objective} · {verdict}")


def sweep_legend(detail: SweepDetail) -> str:
    return (f"{WINNER_MARK} winner: {OBJECTIVE_WORDS.get(detail.objective, detail.objective)} among the passing "
            f"configurations · {FRONT_MARK} Pareto front: no other passing configuration beats it on quality, "
            f"size and speed at once")


def sweep_matrix_markdown(detail: SweepDetail) -> str:
    """The sweep's matrix in Markdown, for the model card and the Prefect artifact.

    One row per configuration (its branch), winner ★ and Pareto front ◆ marked, then the legend.
    Pure: the same detail gives the same text.
    """
    headers, rows = sweep_matrix(detail)
    base = f"base `{detail.base_uri}` @ `{(detail.base_sha or '-')[:12]}`" if detail.base_uri else "base not resolved"
    publishes = detail.publish_mode.replace("_", " ")
    lines = [f"### {md_cell(sweep_headline(detail))}", "", f"sweep `{detail.id}` · {base} · publishes {publishes}", "",
             "| " + " | ".join(md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" if h in SWEEP_TEXT_COLUMNS else "---:" for h in headers) + "|"]
    for row in rows:
        cells = [f"`{cell}`" if header == "branch" else cell for header, cell in zip(headers, row, strict=True)]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    lines += ["", sweep_legend(detail)]
    if detail.error:
        lines += ["", f"**{detail.error_kind or 'error'}**: {md_cell(short(detail.error, 500))}"]
    return "\n".join(lines) + "\n"
