"""``modelfactory artifact verify URI`` / ``modelfactory artifact download URI DEST``.

URI: ``s3://bucket/prefix/<name>/<config>/<key>/`` (or ``.../<name>/<config>/`` to follow
``latest.json``), ``file:///...`` or a local folder. Every file's sha256 is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from modelfactory.core.errors import ModelFactoryError

app = typer.Typer(help="Read published artifacts back and verify them.", no_args_is_help=True)


def _report(result: dict, fmt: str, verb: str) -> None:
    from modelfactory.interfaces.cli.main import console

    if fmt == "json":
        keep = ("uri", "manifest_sha256", "total_bytes", "reused", "name", "config", "key")
        console.print_json(json.dumps({k: result[k] for k in keep if k in result} | {"files": len(result["files"])}))
        return
    console.print(f"[green]{verb}[/green]: {len(result['files'])} files, {result['total_bytes'] / 1e6:.1f} MB, "
                  f"every sha256 matches the manifest\nartifact: {result['uri']}\n"
                  f"manifest sha256: {result['manifest_sha256']}", soft_wrap=True, highlight=False)


@app.command()
def verify(
    uri: Annotated[str, typer.Argument(help="s3://... or file://... artifact folder (or a local path).")],
    format: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Check every file of a published artifact against its manifest (exit 1 on any mismatch)."""
    from modelfactory.interfaces.cli.main import _fail
    from modelfactory.publishing.artifacts import verify_artifact

    try:
        result = verify_artifact(uri=uri)
    except ModelFactoryError as exc:
        _fail(exc)
    _report(result, format, "verified")


@app.command()
def download(
    uri: Annotated[str, typer.Argument(help="s3://... or file://... artifact folder (or a local path).")],
    dest: Annotated[Path, typer.Argument(help="New or empty local folder.")],
    format: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Download a published artifact into DEST, check every sha256, write manifest.json last."""
    from modelfactory.interfaces.cli.main import _fail
    from modelfactory.publishing.artifacts import download_artifact

    try:
        result = download_artifact(uri=uri, dest=dest)
    except ModelFactoryError as exc:
        _fail(exc)
    _report(result, format, "already there" if result.get("reused") else f"downloaded to {dest}")
