"""``modelfactory kernels prepare``: build GPTQModel's CUDA kernels into the factory's cache before the first load."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from modelfactory.interfaces.cli.common import Format, emit, format_option

app = typer.Typer(no_args_is_help=True)


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 on stderr meanwhile: GPTQModel prints its log to stdout and the JIT builds' compilers
    write to the process's fd 1, which ``--format json`` keeps for the result (a redirect of ``sys.stdout``
    alone would not reach the subprocesses)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@app.command()
def prepare(
    kernel: Annotated[Optional[list[str]], typer.Option(
        help="GPTQModel extension to build (repeatable): marlin_fp16, marlin_bf16, machete, ... "
             "Default: marlin_fp16, marlin_bf16, machete.")] = None,
    cutlass_dir: Annotated[Optional[Path], typer.Option(
        help="A CUTLASS v4.7.1 checkout for Machete on a host without network access (GPTQMODEL_CUTLASS_DIR).")] = None,
    format: Annotated[Format, format_option(Format.table, Format.json)] = Format.table,
) -> None:
    """Build the GPTQ kernels once per cache (MODELFACTORY_CACHE_DIR): a fresh GPU worker's first GPTQ load then
    takes seconds, not minutes. Exit 1 when one could not be built (each says why)."""
    from rich.table import Table

    from modelfactory.benchmark.kernel_builds import DEFAULT_KERNELS, prepare_kernels
    from modelfactory.interfaces.cli.library_logs import library_logs

    # GPTQModel's log lines and the compilers' output go to the log file and stderr: stdout carries the result only
    with library_logs("kernels-prepare"), _stdout_to_stderr():
        builds = prepare_kernels(kernels=tuple(kernel or DEFAULT_KERNELS), cutlass_dir=cutlass_dir)

    def table() -> Table:
        out = Table("kernel", "ready", "seconds", "why not")
        for build in builds:
            out.add_row(build.kernel, "yes" if build.ok else "no", f"{build.seconds:.1f}", build.error or "")
        return out

    emit(format, table=table, json=lambda: json.dumps([b.model_dump(mode="json") for b in builds], indent=2))
    if not all(build.ok for build in builds):
        raise typer.Exit(code=1)
