"""What every ``modelfactory`` command shares: the consoles, the error exit and ``--format``.

- Errors of the hierarchy (:class:`~modelfactory.core.errors.ModelFactoryError`) end a command with
  ``error (<kind>): <message>`` on stderr and exit code 1 (:func:`fail`, :func:`reported_errors`);
  anything else is a bug and keeps its traceback.
- ``--format`` is one closed set for all commands, ``table|json|csv`` (:class:`Format`); a command
  offers the subset that makes sense for its output (:func:`format_option`). ``text``, which
  ``artifact verify|download`` took before, still works and means ``table``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, NoReturn

import typer
from rich.console import Console

from modelfactory.core.errors import ModelFactoryError

class _Terminal:
    """Prints through a ``rich`` console made for each call. rich fixes a console's size for good when
    COLUMNS and LINES are both set as it is made, so one made at import keeps the size of whatever
    environment imported this module (a long-lived process: a pytest-xdist worker got 80 columns
    whatever COLUMNS said later, and the tables lost their cells to "…")."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr

    def print(self, *objects: Any, **kwargs: Any) -> None:
        Console(stderr=self._stderr).print(*objects, **kwargs)


console = _Terminal()
err_console = _Terminal(stderr=True)


def fail(exc: ModelFactoryError) -> NoReturn:
    """Print *exc* as one clean line (no traceback) and exit 1."""
    err_console.print(f"[red]error ({exc.kind}):[/red] {exc.message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


@contextmanager
def reported_errors() -> Iterator[None]:
    """``with reported_errors(): ...``: an error of the hierarchy inside ends the command via :func:`fail`."""
    try:
        yield
    except ModelFactoryError as exc:
        fail(exc)


class Format(StrEnum):
    """Output of a command: a rich table (or the human-readable text), JSON, or CSV.

    A ``StrEnum``: ``str(Format.json) == "json"``. Typer before 0.29 runs its own enum conversion on
    what :func:`format_option`'s parser returns, by ``str(value)``: a plain ``(str, Enum)`` member
    reads ``"Format.json"`` there, matches nothing, and the command got ``None`` (a table).
    """

    table = "table"
    json = "json"
    csv = "csv"


#: Values commands accepted before ``--format`` was unified, and what they mean now.
LEGACY_FORMATS = {"text": Format.table}


def parse_format(value: str | Format, *, allowed: tuple[Format, ...]) -> Format:
    """*value* as a :class:`Format` out of *allowed* (legacy spellings too); ``BadParameter`` otherwise."""
    fmt = value if isinstance(value, Format) else LEGACY_FORMATS.get(value) or next(
        (f for f in Format if f.value == value), None)
    if fmt is None or fmt not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(f.value for f in allowed)}")
    return fmt


def format_option(*allowed: Format) -> Any:
    """The ``--format`` option of a command whose output exists in *allowed* formats (default: all)."""
    allowed = allowed or tuple(Format)
    names = [f.value for f in allowed]
    return typer.Option("--format", parser=lambda value: parse_format(value, allowed=allowed),
                        metavar="[" + "|".join(names) + "]", help=f"Output: {', '.join(names)}.")


def emit(fmt: Format, *, table: Callable[[], Any], json: Callable[[], str],
         csv: Callable[[], str] | None = None) -> None:
    """Write the output in *fmt*: *table* is printed by rich, *json* and *csv* are written as they are."""
    if fmt is Format.json:
        sys.stdout.write(json() + "\n")
    elif fmt is Format.csv:
        if csv is None:  # format_option offers csv only where a command passes it
            raise typer.BadParameter("csv is not available for this command", param_hint="--format")
        sys.stdout.write(csv())
    else:
        console.print(table())
