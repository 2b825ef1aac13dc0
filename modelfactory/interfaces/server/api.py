"""Read-only JSON API over the run catalog: the queries of ``modelfactory catalog``, over HTTP.

- ``GET /api/runs``            filters of ``catalog ls`` (base, adapter, status, bits, group_size,
                               desc_act, config, since, until, max_kld, min_top1, min_task_recovery,
                               sort, limit) → ``{"runs": [...]}``
- ``GET /api/runs/{id}``       one run (id or unique 6+ character prefix), everything recorded
- ``GET /api/compare?run=A&run=B``  runs side by side with % changes against the first
- ``GET /api/best?base=X&max_ppl_increase=3%&by=speed``  the Pareto-best passing build (404: none);
                               also adapter, bits, max_kld, min_top1, min_task_recovery
- ``GET /api/lineage?ref=R``   base → adapters → spec → run → artifact → publications
- ``GET /api/leaderboard``     finished builds per base model
- ``GET /api/sweeps``          sweeps newest first (status, base, limit) → ``{"sweeps": [...]}``
- ``GET /api/sweeps/{id}``     one sweep (id or unique 6+ character prefix): its matrix, winner, front

Errors are ``{"detail": {"error": kind, "message": ...}}`` (:func:`http_status`; the message names no
database URL and no path of the server: :func:`public_message`, the full one is logged): 400 a bad query
(a bad filter value, an ambiguous run id prefix), 404 not found, 503 the catalog database unreachable
or not migrated; FastAPI itself answers 422 for a parameter of the wrong type or out of range. The app refuses to start (lifespan) when the catalog's
schema is behind the code's: run ``modelfactory catalog upgrade``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, FastAPI, HTTPException, Query

from modelfactory.catalog import Catalog, open_catalog
from modelfactory.core.errors import (
    CatalogError,
    CatalogNotFoundError,
    CatalogQueryError,
)
from modelfactory.core.log import get_logger

T = TypeVar("T")


def catalog_url() -> str:
    from modelfactory.core.settings import get_settings

    return get_settings().resolved_catalog_url


@lru_cache(maxsize=8)
def _catalog(url: str) -> Catalog:
    # Never auto-upgrades: a catalog behind head raises (the message says `catalog upgrade`).
    return open_catalog(url)


def get_catalog() -> Catalog:
    """The catalog at ``MODELFACTORY_CATALOG_URL``, opened once per URL (a new empty one is created)."""
    return _catalog(catalog_url())


@asynccontextmanager
async def check_catalog(_app: FastAPI) -> AsyncIterator[None]:
    """Refuse to start on a catalog that cannot be opened or is behind the code's schema; close the runs
    and sweeps whose process died while no server was watching (``catalog reconcile``, best effort)."""
    catalog = get_catalog()
    from modelfactory.interfaces.reconcile import reconcile_catalog

    try:
        for item in reconcile_catalog(catalog):
            get_logger().warning(f"serve: closed {item.kind} {item.id} as crashed: {item.reason}")
    except Exception as exc:  # noqa: BLE001 - serving the catalog matters more; `catalog reconcile` retries
        get_logger().warning(f"serve: could not reconcile the catalog's running runs: {exc}")
    yield


router = APIRouter(prefix="/api", tags=["catalog"], lifespan=check_catalog)


#: HTTP status per catalog error, most specific first: the client's mistake, a missing row, and
#: else (a plain CatalogError) the database failing -- unreachable, or its schema not migrated.
HTTP_STATUSES: tuple[tuple[type[CatalogError], int], ...] = (
    (CatalogQueryError, 400),
    (CatalogNotFoundError, 404),
    (CatalogError, 503),
)


def http_status(exc: CatalogError) -> int:
    """The HTTP status answering *exc* (the JSON API and the HTML pages)."""
    return next(status for kind, status in HTTP_STATUSES if isinstance(exc, kind))


#: A database URL in a message, with the " at " before it (``sqlite:////srv/x/catalog.db``,
#: ``postgresql+psycopg://user@host/db``); trailing punctuation stays.
_DATABASE_URL = re.compile(r"(?:\s+at)?\s+\b(?:sqlite|postgres(?:ql)?|mysql)(?:\+\w+)?://\S*?(?=[:;,.)]*(?:\s|$))")


def public_message(exc: CatalogError) -> str:
    """*exc*'s message as the server answers it (API and pages): what failed and what to do, but no database
    URL and no path of this server (cut to its last component). The full message goes to the server log."""
    from modelfactory.publishing.public import local_roots, scrub_text

    get_logger().info(f"catalog error answered to a client: {exc.message}")
    if http_status(exc) >= 500:  # the database's own words name its host: only what failed, and when to retry
        return f"{_DATABASE_URL.split(exc.message)[0]}: the server's log has the details; retry later"
    return scrub_text(_DATABASE_URL.sub("", exc.message), roots=local_roots())


def answer(query: Callable[[], T]) -> T:
    """Run *query*, turning catalog errors into HTTP errors that carry the kind and message."""
    try:
        return query()
    except CatalogError as exc:
        raise HTTPException(status_code=http_status(exc),
                            detail={"error": exc.kind, "message": public_message(exc)}) from exc


@router.get("/runs")
def list_runs(
    base: str | None = None,
    adapter: str | None = None,
    status: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    desc_act: bool | None = None,
    config: str | None = None,
    since: str | None = None,
    until: str | None = None,
    max_kld: Annotated[str | None, Query(description="Max mean KL divergence from fp16 (nats/token), e.g. 0.05")]
    = None,
    min_top1: Annotated[str | None, Query(description="Min top-1 agreement with fp16, e.g. 95%")] = None,
    min_task_recovery: Annotated[str | None, Query(description="Min task recovery (lowest over tasks), e.g. 97%")]
    = None,
    sort: str = "newest",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
) -> dict[str, Any]:
    """Runs matching every given filter (same semantics as ``modelfactory catalog ls``)."""
    from modelfactory.catalog.queries import (
        RunFilter,
        parse_when,
        query_runs,
        verdict_bounds,
    )

    def query() -> dict[str, Any]:
        filters = RunFilter(base=base, adapter=adapter, status=status, bits=bits, group_size=group_size,
                            desc_act=desc_act, config=config, since=parse_when(since) if since else None,
                            until=parse_when(until, end=True) if until else None,
                            **verdict_bounds(max_kld=max_kld, min_top1=min_top1, min_task_recovery=min_task_recovery))
        rows = query_runs(get_catalog(), filters=filters, sort=sort, limit=limit)
        return {"runs": [row.to_dict() for row in rows]}

    return answer(query)


@router.get("/runs/{run_id}")
def get_run(run_id: str) -> dict[str, Any]:
    """Everything recorded about one run."""
    return answer(lambda: get_catalog().get_run(run_id).to_dict())


@router.get("/compare")
def compare(run: Annotated[list[str], Query(description="Run ids (repeat: ?run=A&run=B)")]) -> dict[str, Any]:
    from modelfactory.catalog.queries import compare_runs

    return answer(lambda: compare_runs(get_catalog(), run_ids=run).to_dict())


@router.get("/best")
def best(
    base: str,
    max_ppl_increase: str | None = None,
    by: str = "speed",
    adapter: str | None = None,
    bits: int | None = None,
    max_kld: str | None = None,
    min_top1: str | None = None,
    min_task_recovery: str | None = None,
) -> dict[str, Any]:
    """The Pareto-best passing build of *base*; 404 when no build qualifies."""
    from modelfactory.catalog.queries import (
        RunFilter,
        best_build,
        no_best_message,
        parse_percent,
        verdict_bounds,
    )

    def query() -> dict[str, Any]:
        limit = parse_percent(max_ppl_increase) if max_ppl_increase is not None else None
        bounds = verdict_bounds(max_kld=max_kld, min_top1=min_top1, min_task_recovery=min_task_recovery)
        found = best_build(get_catalog(), base=base, max_ppl_increase_pct=limit, by=by,
                           filters=RunFilter(adapter=adapter, bits=bits, **bounds))
        if found.best is None:
            raise CatalogNotFoundError(
                no_best_message(found, relax="max_ppl_increase, max_kld, min_top1 or min_task_recovery"))
        return found.to_dict()

    return answer(query)


@router.get("/lineage")
def lineage(ref: Annotated[str, Query(description="Run id, artifact/publication URI or manifest sha256")]) -> dict:
    from modelfactory.catalog.queries import lineage as trace

    return answer(lambda: trace(get_catalog(), ref=ref).to_dict())


@router.get("/lineage/{ref:path}")
def lineage_path(ref: str) -> dict[str, Any]:
    return lineage(ref)


@router.get("/leaderboard")
def leaderboard(base: str | None = None, rows: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    from modelfactory.catalog.queries import leaderboard as boards

    return answer(lambda: {"boards": [b.to_dict() for b in boards(get_catalog(), base=base, rows=rows)]})


@router.get("/sweeps")
def list_sweeps(
    status: str | None = None,
    base: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
) -> dict[str, Any]:
    """Sweeps newest first (same semantics as ``modelfactory catalog sweeps``)."""
    return answer(lambda: {"sweeps": [s.to_dict() for s in get_catalog().list_sweeps(
        status=status, base=base, limit=limit)]})  # type: ignore[arg-type]


@router.get("/sweeps/{sweep_id}")
def get_sweep(sweep_id: str) -> dict[str, Any]:
    """One sweep: its spec, status, winner, front and one row per configuration (its run)."""
    return answer(lambda: get_catalog().get_sweep(sweep_id).to_dict())
