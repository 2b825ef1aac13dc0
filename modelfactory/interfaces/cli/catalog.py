"""``modelfactory catalog ...``: query the run catalog (the queries live in ``modelfactory.catalog.queries``;
this module only parses options and renders: ``--format table|json|csv``)."""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Annotated, Optional, get_args

import typer

from modelfactory.core import sweep_spec as objectives

from modelfactory.interfaces.cli.common import (
    Format,
    console,
    emit,
    format_option,
    reported_errors,
)

app = typer.Typer(help="Query the run catalog.", no_args_is_help=True)


class Sort(str, Enum):
    newest = "newest"
    oldest = "oldest"
    ppl = "ppl"
    speed = "speed"
    size = "size"
    memory = "memory"
    kld = "kld"
    top1 = "top1"
    recovery = "recovery"
    name = "name"


#: ``catalog best --by``: the one objective (``core.sweep_spec.Objective``, a sweep's too), as a StrEnum (see Format).
Objective = StrEnum("Objective", {name: name for name in get_args(objectives.Objective)})


FormatOption = Annotated[Format, format_option(Format.table, Format.json, Format.csv)]
MaxKldOption = Annotated[Optional[str], typer.Option(
    "--max-kld", help="Max mean KL divergence from fp16 (nats per token), e.g. 0.05.")]
MinTop1Option = Annotated[Optional[str], typer.Option(
    "--min-top1", help="Min top-1 agreement with fp16 in %, e.g. 95 or 95%.")]
MinRecoveryOption = Annotated[Optional[str], typer.Option(
    "--min-task-recovery", help="Min task recovery (GPTQ score as % of fp16's, lowest over the lm-eval tasks), "
                                "e.g. 97%.")]


def _open():
    from modelfactory.catalog import open_catalog

    return open_catalog()


@app.command("ls")
def catalog_ls(
    base: Annotated[Optional[str], typer.Option(help="Base model URI or commit SHA (7+ character prefix).")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="Adapter URI or commit SHA (7+ character prefix).")] = None,
    status: Annotated[Optional[str], typer.Option(help="running, passed, failed or rejected.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="GPTQ bits.")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="GPTQ group size (-1 = per row).")] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", help="Activation order.")] = None,
    config: Annotated[Optional[str], typer.Option(help="Config label, e.g. gptq-4bit-128g.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Started at or after (ISO date/datetime, UTC).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Started before (a bare date includes that day).")] = None,
    max_kld: MaxKldOption = None,
    min_top1: MinTop1Option = None,
    min_task_recovery: MinRecoveryOption = None,
    sort: Annotated[Sort, typer.Option(help="newest, oldest, ppl (lowest increase), speed (fastest), size, "
                                            "memory (smallest ratio), kld (lowest KL divergence), top1 (highest "
                                            "agreement), recovery (highest task recovery), name.")] = Sort.newest,
    limit: Annotated[int, typer.Option(help="At most N runs.")] = 50,
    format: FormatOption = Format.table,
) -> None:
    """List runs matching every given filter (newest first unless --sort)."""
    from modelfactory.catalog.queries import (
        RunFilter,
        parse_when,
        query_runs,
        verdict_bounds,
    )
    from modelfactory.interfaces.cli.render import record_json, rows_csv, rows_table

    with reported_errors():
        filters = RunFilter(base=base, adapter=adapter, status=status, bits=bits, group_size=group_size,
                            desc_act=desc_act, config=config, since=parse_when(since) if since else None,
                            until=parse_when(until, end=True) if until else None,
                            **verdict_bounds(max_kld=max_kld, min_top1=min_top1, min_task_recovery=min_task_recovery))
        rows = query_runs(_open(), filters=filters, sort=sort.value, limit=limit)
    emit(format, table=lambda: rows_table(rows), json=lambda: record_json(rows), csv=lambda: rows_csv(rows))


@app.command("show")
def catalog_show(
    run_id: Annotated[str, typer.Argument(help="Run or sweep id, or a unique prefix (>= 6 characters).")],
    format: FormatOption = Format.table,
) -> None:
    """Show one run (metrics side by side, steps, gate, artifacts) or one sweep (its matrix)."""
    from modelfactory.interfaces.cli.render import (
        detail_csv,
        record_json,
        run_detail_table,
        sweep_csv,
        sweep_table,
    )

    with reported_errors():
        catalog = _open()
        kind, full_id = catalog.identify(run_id)
        if kind == "sweep":
            sweep = catalog.get_sweep(full_id)
        else:
            detail = catalog.get_run(full_id)
    if kind == "sweep":
        emit(format, table=lambda: sweep_table(sweep), json=lambda: record_json(sweep), csv=lambda: sweep_csv(sweep))
        return
    emit(format, table=lambda: run_detail_table(detail), json=lambda: record_json(detail),
         csv=lambda: detail_csv(detail))


@app.command("sweeps")
def catalog_sweeps(
    status: Annotated[Optional[str], typer.Option(help="running, finished or failed.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model URI or commit SHA (7+ character prefix).")] = None,
    limit: Annotated[int, typer.Option(help="At most N sweeps.")] = 50,
    format: FormatOption = Format.table,
) -> None:
    """List sweeps, newest first (`catalog show SWEEP` prints one's matrix)."""
    from modelfactory.interfaces.cli.render import record_json, sweeps_csv, sweeps_table

    with reported_errors():
        sweeps = _open().list_sweeps(status=status, base=base, limit=limit)  # type: ignore[arg-type]
    emit(format, table=lambda: sweeps_table(sweeps), json=lambda: record_json(sweeps),
          csv=lambda: sweeps_csv(sweeps))


@app.command("compare")
def catalog_compare(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids (or unique prefixes).")],
    format: FormatOption = Format.table,
) -> None:
    """Runs side by side: config, gate and every metric, with % change against the first run."""
    from modelfactory.catalog.queries import compare_runs
    from modelfactory.interfaces.cli.render import (
        comparison_csv,
        comparison_table,
        record_json,
    )

    with reported_errors():
        comparison = compare_runs(_open(), run_ids=run_ids)
    emit(format, table=lambda: comparison_table(comparison), json=lambda: record_json(comparison),
         csv=lambda: comparison_csv(comparison))


@app.command("best")
def catalog_best(
    base: Annotated[str, typer.Option(help="Base model URI or commit SHA.")],
    max_ppl_increase: Annotated[Optional[str], typer.Option(help="Max perplexity increase, e.g. 3%.")] = None,
    by: Annotated[Objective, typer.Option(help="speed (highest decode speed-up), size or memory (lowest ratio), "
                                               "quality (lowest KL divergence from fp16): a sweep's objectives.")]
    = Objective.speed,  # type: ignore[attr-defined]
    adapter: Annotated[Optional[str], typer.Option(help="Only builds with this adapter (URI or SHA).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Only this many GPTQ bits.")] = None,
    max_kld: MaxKldOption = None,
    min_top1: MinTop1Option = None,
    min_task_recovery: MinRecoveryOption = None,
    format: FormatOption = Format.table,
) -> None:
    """The Pareto-best passing build of a base model (exit 1 when none qualifies)."""
    from modelfactory.catalog.queries import (
        RunFilter,
        best_build,
        no_best_message,
        parse_percent,
        verdict_bounds,
    )
    from modelfactory.interfaces.cli.render import best_csv, best_table, record_json
    from modelfactory.core.errors import CatalogNotFoundError

    with reported_errors():
        limit = parse_percent(max_ppl_increase) if max_ppl_increase is not None else None
        bounds = verdict_bounds(max_kld=max_kld, min_top1=min_top1, min_task_recovery=min_task_recovery)
        best = best_build(_open(), base=base, max_ppl_increase_pct=limit, by=by.value,
                          filters=RunFilter(adapter=adapter, bits=bits, **bounds))
        if best.best is None:
            raise CatalogNotFoundError(
                no_best_message(best, relax="--max-ppl-increase, --max-kld, --min-top1 or --min-task-recovery")
                + f", or list the runs with `modelfactory catalog ls --base {base}`"
            )
    emit(format, table=lambda: best_table(best), json=lambda: record_json(best), csv=lambda: best_csv(best))


@app.command("lineage")
def catalog_lineage(
    artifact: Annotated[str, typer.Argument(help="Run id (prefix), artifact or publication URI, or manifest sha256.")],
    format: FormatOption = Format.table,
) -> None:
    """Where an artifact came from: base SHA → adapters → spec → run → artifact → publications."""
    from modelfactory.catalog.queries import lineage
    from modelfactory.interfaces.cli.render import lineage_csv, lineage_table, record_json

    with reported_errors():
        chain = lineage(_open(), ref=artifact)
    emit(format, table=lambda: lineage_table(chain), json=lambda: record_json(chain), csv=lambda: lineage_csv(chain))


@app.command("upgrade")
def catalog_upgrade() -> None:
    """Migrate the catalog database to the current schema (Alembic; safe to run twice)."""
    from modelfactory.catalog import open_catalog

    with reported_errors():
        catalog = open_catalog(auto_upgrade=True)
    console.print(f"catalog {catalog.url} at revision {catalog.current_revision()}", soft_wrap=True)


@app.command("reconcile")
def catalog_reconcile() -> None:
    """Close runs and sweeps still shown ``running`` whose process died (killed, out of memory, host lost).

    A run whose flow run the Prefect server (``PREFECT_API_URL``) reports ended, or that is gone from
    it and stopped renewing its liveness lease in the catalog, becomes ``failed`` (``crashed``) with the
    reason. Runs that are alive are never touched; safe to repeat. ``modelfactory serve`` does it once at start.
    """
    from modelfactory.interfaces.reconcile import reconcile_catalog

    with reported_errors():
        closed = reconcile_catalog(_open())
    for item in closed:
        console.print(f"crashed: {item.kind} {item.id}: {item.reason}", soft_wrap=True, highlight=False)
    console.print(f"{len(closed)} run(s)/sweep(s) closed as crashed", highlight=False)


@app.command("import")
def catalog_import(
    uris: Annotated[list[str], typer.Argument(help="Artifact URIs (file:// or s3:// folders holding a manifest.json).")],
) -> None:
    """Record published artifacts from their manifests (after the catalog was down at the end of a run).

    Safe to repeat: an artifact the catalog knows is left alone; the unfinished run that published
    it is completed; otherwise a new run is recorded.
    """
    from modelfactory.catalog.recovery import import_artifact

    with reported_errors():
        catalog = _open()
        for uri in uris:
            result = import_artifact(catalog, uri=uri)
            console.print(f"{result.action}: run {result.run_id} ← {uri}", soft_wrap=True, highlight=False)
