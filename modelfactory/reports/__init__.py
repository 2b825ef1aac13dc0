"""Reports of catalog records that the factory itself leaves: a run's Markdown summary (the record
step's Prefect artifact) and a sweep's matrix (the sweep flow's Prefect artifact, the model card, and
the table that the CLI and the leaderboard page show).

- :mod:`~modelfactory.reports.run_summary`   ``run_markdown``: every metric grouped, runnability, the gate
- :mod:`~modelfactory.reports.sweep_matrix`  ``sweep_matrix`` (headers + cells), headline, legend, Markdown
- :mod:`~modelfactory.reports.cells`         cell formats every rendering shares

The terminal, CSV and JSON output of the CLI lives in :mod:`modelfactory.interfaces.cli.render`, the
HTML pages in :mod:`modelfactory.interfaces.server.pages` (Jinja2 templates).
"""

from modelfactory.reports.run_summary import run_markdown
from modelfactory.reports.sweep_matrix import sweep_matrix, sweep_matrix_markdown

__all__ = ["run_markdown", "sweep_matrix", "sweep_matrix_markdown"]
