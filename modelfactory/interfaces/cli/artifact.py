"""``modelfactory artifact verify URI`` / ``modelfactory artifact download URI DEST``.

URI: ``s3://bucket/prefix/<name>/<config>/<key>/`` (or ``.../<name>/<config>/`` to follow
``latest.json``), ``file:///...`` or a local folder. Every file's sha256 is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from modelfactory.interfaces.cli.common import (
    Format,
    emit,
    format_option,
    reported_errors,
)

app = typer.Typer(help="Read published artifacts back and verify them.", no_args_is_help=True)

#: A verified artifact is one summary, not rows: no csv. ``text``, the old name of ``table``, still works.
ArtifactFormat = Annotated[Format, format_option(Format.table, Format.json)]


def _report(result: dict[str, Any], fmt: Format, verb: str) -> None:
    from rich.text import Text

    keep = ("uri", "manifest_sha256", "total_bytes", "reused", "name", "config", "key")
    summary = {k: result[k] for k in keep if k in result} | {"files": len(result["files"])}
    text = Text.from_markup(
        f"[green]{verb}[/green]: {len(result['files'])} files, {result['total_bytes'] / 1e6:.1f} MB, "
        f"every sha256 matches the manifest\nartifact: {result['uri']}\nmanifest sha256: {result['manifest_sha256']}",
        overflow="ignore")
    text.no_wrap = True  # long URIs stay whole (copy-pasteable)
    emit(fmt, json=lambda: json.dumps(summary, indent=2), table=lambda: text)


@app.command()
def verify(
    uri: Annotated[str, typer.Argument(help="s3://... or file://... artifact folder (or a local path).")],
    format: ArtifactFormat = Format.table,
) -> None:
    """Check every file of a published artifact against its manifest (exit 1 on any mismatch)."""
    from modelfactory.publishing.artifacts import verify_artifact

    with reported_errors():
        result = verify_artifact(uri=uri)
    _report(result, format, "verified")


@app.command()
def download(
    uri: Annotated[str, typer.Argument(help="s3://... or file://... artifact folder (or a local path).")],
    dest: Annotated[Path, typer.Argument(help="New or empty local folder.")],
    format: ArtifactFormat = Format.table,
) -> None:
    """Download a published artifact into DEST, check every sha256, write manifest.json last."""
    from modelfactory.publishing.artifacts import download_artifact

    with reported_errors():
        result = download_artifact(uri=uri, dest=dest)
    _report(result, format, "already there" if result.get("reused") else f"downloaded to {dest}")
