"""Cell formats shared by every rendering of catalog records: the terminal and CSV (the CLI), Markdown
(Prefect artifacts, the model card) and HTML (the leaderboard page)."""

from __future__ import annotations

from collections.abc import Sequence


def number(value: float | None) -> str:
    """A measure to 4 significant digits, ``-`` when it was not measured."""
    return "-" if value is None else f"{value:.4g}"


def short(text: str | None, width: int) -> str:
    """The first line of *text*, cut to *width* characters (``…`` marks a cut)."""
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def adapters_text(adapters: Sequence[dict]) -> str:
    """A run's adapters as ``uri@sha8, ...``."""
    return ", ".join(f"{a.get('uri', '')}@{str(a.get('sha') or '')[:8]}" for a in adapters)


def md_cell(text: str) -> str:
    """*text* safe inside a Markdown table cell (pipes escaped, one line)."""
    return text.replace("|", "\\|").replace("\n", " ")
