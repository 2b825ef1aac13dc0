"""The Jinja2 environment of the server's HTML: the templates in ``templates/`` (package data), every
value escaped (autoescape on, SVG included), an undefined name an error rather than an empty string."""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined


def number(value: float | None, fmt: str = ".3g") -> str:
    """A measure in a page cell: *fmt*, or an en dash when it was not measured."""
    return "–" if value is None else format(value, fmt)


TEMPLATES = Environment(loader=PackageLoader("modelfactory.interfaces.server", "templates"), autoescape=True,
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
TEMPLATES.filters["num"] = number
