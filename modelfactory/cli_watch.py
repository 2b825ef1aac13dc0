"""``modelfactory watch ...``: stub, filled in by its own change."""

from __future__ import annotations

import typer

app = typer.Typer(help="watch commands.", no_args_is_help=True)
