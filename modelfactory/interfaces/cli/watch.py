"""``modelfactory watch add|ls|rm``: the watch list (repos whose new commits start the factory).

A watch maps a Hub repo to its builds: an adapter repo to the base model it is merged into
(``--base``), or a base model repo (``--kind base``), plus the spec fields and gate of its runs
(flags below, or ``--spec FILE`` with any FactorySpec fields but ``base.uri``/``adapters``; a
sweep spec file's fields, with ``grid`` or ``configs``, make every build a sweep). The webhook
(``POST /hooks/huggingface``) and the nightly check build its new commits (``docs/triggers.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from modelfactory.core.errors import SpecError
from modelfactory.interfaces.cli.common import (
    Format,
    console,
    emit,
    format_option,
    reported_errors,
)

if TYPE_CHECKING:
    from modelfactory.catalog.records import WatchRecord

app = typer.Typer(help="The watch list: repos whose new commits start the factory.", no_args_is_help=True)


def _prune(value: Any) -> Any:
    """Drop unset (``None``) flags and the empty sections they leave."""
    if not isinstance(value, dict):
        return value
    pruned = {k: _prune(v) for k, v in value.items() if v is not None}
    return {k: v for k, v in pruned.items() if v != {}}


@app.command("add")
def add(
    repo: Annotated[str, typer.Argument(help="Hub repo to watch, owner/name.")],
    base: Annotated[Optional[str], typer.Option(help="Base model the adapter is merged into (Hub id, folder, .gguf, s3://).")] = None,
    kind: Annotated[str, typer.Option(help="adapter (a LoRA repo on top of --base) or base (a base model repo).")] = "adapter",
    revision: Annotated[str, typer.Option(help="Branch of REPO to follow.")] = "main",
    base_revision: Annotated[Optional[str], typer.Option(help="Hub revision of --base (default: its main).")] = None,
    spec: Annotated[Optional[Path], typer.Option(help="YAML/JSON with spec fields of the builds (a factory spec, or a sweep "
                                                 "spec with grid/configs), without base.uri/adapters; flags override it.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run/artifact name (default: owner--name).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="GPTQ bits (2, 3, 4, 8).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="GPTQ group size (-1 = per row).")] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", help="Activation order.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Calibration sequences.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Calibration sequence length.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Benchmark device: auto, cpu or cuda.")] = None,
    max_ppl_increase_pct: Annotated[Optional[float], typer.Option(help="Gate: max perplexity increase %.")] = None,
    min_decode_speedup: Annotated[Optional[float], typer.Option(help="Gate: min decode speed-up.")] = None,
    max_size_ratio: Annotated[Optional[float], typer.Option(help="Gate: max disk size ratio.")] = None,
    max_memory_ratio: Annotated[Optional[float], typer.Option(help="Gate: max memory ratio.")] = None,
    destination: Annotated[Optional[str], typer.Option(help="Where passing builds are published (file://, s3://, hf://).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing watch of REPO.")] = False,
) -> None:
    """Watch REPO: each new commit of its branch is built with these spec fields and gate."""
    from modelfactory.catalog import open_catalog
    from modelfactory.core.specs import merge_overrides, read_spec_file
    from modelfactory.triggers import describe_build, normalize_repo, validate_watch

    with reported_errors():
        repo = normalize_repo(repo=repo)
        fields = read_spec_file(spec) if spec else {}
        fields = merge_overrides(fields, _prune({
            "name": name,
            "base": {"revision": base_revision},
            "quantize": {"bits": bits, "group_size": group_size, "desc_act": desc_act,
                         "calibration": {"num_samples": num_samples, "seq_len": seq_len}},
            "benchmark": {"device": device},
            "gate": {"max_ppl_increase_pct": max_ppl_increase_pct, "min_decode_speedup": min_decode_speedup,
                     "max_size_ratio": max_size_ratio, "max_memory_ratio": max_memory_ratio},
            "publish": {"destination": destination},
        }))
        if kind == "base" and (base or "base" in fields):
            raise SpecError(f"--kind base watches {repo!r} itself as the base model: drop --base/--base-revision")
        build = validate_watch(repo=repo, kind=kind, base=base, fields=fields)  # an unknown kind: SpecError naming both
        with open_catalog() as catalog:
            watch = catalog.add_watch(repo=repo, kind=kind, base=base, revision=revision, spec=fields,
                                      replace=replace)
    console.print(f"watching {watch.repo}@{watch.revision} ({watch.kind}"
                  + (f" on {watch.base}" if watch.base else "") + f"); each build: {describe_build(build)}; "
                  f"spec fields {json.dumps(watch.spec)}\n"
                  "its next commit is built (webhook), or the current one at the next nightly check",
                  highlight=False, soft_wrap=True, markup=False)  # JSON lists are not rich markup tags


#: ``watch ls`` columns, in order (JSON keys and CSV header). ``build``: ``run`` or ``sweep``;
#: ``configurations``: how many a build makes (a sweep's members; 1 for a run; empty when the stored
#: fields no longer make a valid spec).
WATCH_FIELDS = ("repo", "kind", "base", "revision", "last_sha", "build", "configurations", "spec", "updated_at")


def _watch_row(watch: WatchRecord) -> dict[str, Any]:
    from modelfactory.core.sweep_spec import SweepSpec
    from modelfactory.triggers import is_sweep, watch_builds

    build = watch_builds(watch)
    return {"repo": watch.repo, "kind": watch.kind, "base": watch.base, "revision": watch.revision,
            "last_sha": watch.last_sha, "build": "sweep" if is_sweep(watch.spec) else "run",
            "configurations": (len(build.members()) if isinstance(build, SweepSpec) else 1) if build else None,
            "spec": watch.spec, "updated_at": watch.updated_at.isoformat() if watch.updated_at else None}


def _watches_table(watches: list[WatchRecord]) -> Any:
    from rich.table import Table

    table = Table("repo", "kind", "base", "branch", "last built", "builds", "spec fields")
    for w, row in zip(watches, map(_watch_row, watches), strict=True):
        builds = ("run" if row["build"] == "run" else
                  f"sweep of {row['configurations']}" if row["configurations"] else "sweep (spec invalid)")
        table.add_row(w.repo, w.kind, w.base or "-", w.revision, (w.last_sha or "-")[:12], builds,
                      json.dumps(w.spec, separators=(",", ":")))
    return table


def _watches_csv(watches: list[WatchRecord]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=WATCH_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in map(_watch_row, watches):
        writer.writerow({k: json.dumps(v, separators=(",", ":")) if k == "spec" else ("" if v is None else v)
                         for k, v in row.items()})
    return out.getvalue()


@app.command("ls")
def ls(format: Annotated[Format, format_option(Format.table, Format.json, Format.csv)] = Format.table) -> None:
    """List watched repos, their base, followed branch, last built commit, what a build is (a run, or a sweep of
    N configurations) and spec fields."""
    from modelfactory.catalog import open_catalog

    with reported_errors(), open_catalog() as catalog:
        watches = catalog.list_watches()
    emit(format, table=lambda: _watches_table(watches),
         json=lambda: json.dumps([_watch_row(w) for w in watches], indent=2), csv=lambda: _watches_csv(watches))


@app.command("rm")
def rm(repo: Annotated[str, typer.Argument(help="Watched repo, owner/name.")]) -> None:
    """Stop watching REPO (runs and deliveries already recorded stay in the catalog)."""
    from modelfactory.catalog import open_catalog
    from modelfactory.core.errors import CatalogNotFoundError
    from modelfactory.triggers import normalize_repo

    with reported_errors():
        repo = normalize_repo(repo=repo)
        with open_catalog() as catalog:
            removed = catalog.remove_watch(repo)
        if not removed:
            raise CatalogNotFoundError(f"{repo!r} is not on the watch list: see `modelfactory watch ls`")
    console.print(f"stopped watching {repo}", highlight=False)
