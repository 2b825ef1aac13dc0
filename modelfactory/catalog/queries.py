"""The catalog queries people use: filtered run lists, comparisons, the best build, lineage.

Pure functions over a catalog's connections (:class:`~modelfactory.catalog.connections.CatalogConnections`,
the base of :class:`~modelfactory.catalog.Catalog`, which they never import): they read, never write, and
return the plain records of :mod:`modelfactory.catalog.records`; the CLI, the JSON API and
the leaderboard page only render them. Bad input raises :class:`CatalogQueryError`, a missing
run / artifact / base model :class:`CatalogNotFoundError`.

>>> query_runs(catalog, filters=RunFilter(base="org/base", status="passed", bits=4), sort="speed")
>>> best_build(catalog, base="org/base", max_ppl_increase_pct=3.0, by="speed").best
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, func, or_, select, union_all
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.sql import operators

from modelfactory.catalog.connections import CatalogConnections
from modelfactory.catalog.ids import resolve_run_id
from modelfactory.catalog.mappers import DETAIL_LOADS, ROW_COLUMNS, aware, run_detail, run_row
from modelfactory.catalog.models import (
    AdapterVersion,
    Artifact,
    BaseModelVersion,
    Publication,
    Run,
    RunAdapter,
)
from modelfactory.catalog.records import (
    RUN_STATUSES,
    BestBuild,
    Board,
    ComparedMetric,
    Comparison,
    Lineage,
    LineageMatch,
    LineageNode,
    Objective,
    RunDetail,
    RunRow,
    RunStatus,
)
from modelfactory.core.errors import CatalogNotFoundError, CatalogQueryError
from modelfactory.core.sweep_spec import OBJECTIVE_METRICS

#: ``sort`` keys of :func:`query_runs`.
SortKey = Literal["newest", "oldest", "ppl", "speed", "size", "memory", "kld", "top1", "recovery", "name"]

#: Column and direction of each ``sort`` key (its natural direction; ties: newest first).
SORTS: dict[SortKey, tuple[Any, Literal["asc", "desc"]]] = {
    "newest": (Run.started_at, "desc"),
    "oldest": (Run.started_at, "asc"),
    "ppl": (Run.ppl_increase_pct, "asc"),
    "speed": (Run.decode_speedup, "desc"),
    "size": (Run.size_ratio, "asc"),
    "memory": (Run.memory_ratio, "asc"),
    "kld": (Run.kld_mean, "asc"),
    "top1": (Run.top1_agreement_pct, "desc"),
    "recovery": (Run.task_recovery_pct, "desc"),
    "name": (Run.name, "asc"),
}
#: ``by`` objectives of :func:`best_build` (``core.sweep_spec.OBJECTIVE_METRICS``): the column and whether
#: higher is better.
OBJECTIVES: dict[Objective, tuple[Any, bool]] = {
    name: (getattr(Run, metric), higher) for name, (metric, higher) in OBJECTIVE_METRICS.items()}
#: The :class:`RunFilter` fields that bound the verdict's quality measures.
VERDICT_FILTERS = ("max_kld", "min_top1", "min_task_recovery")
MAX_LIMIT = 10_000
MAX_COMPARE = 20
#: Shortest SHA prefix that matches a base model / adapter commit.
MIN_SHA_PREFIX = 7
_MANIFEST_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFilter:
    """Filters of ``catalog ls`` / ``GET /api/runs``; every given one must hold (AND).

    *base* and *adapter* match a URI exactly or a commit SHA (a prefix of 7+ characters will do);
    *since* is inclusive, *until* exclusive (a date-only value from :func:`parse_when` covers the day).
    *max_kld* (mean KL divergence from fp16, nats per token), *min_top1* (top-1 agreement, %) and
    *min_task_recovery* (task recovery, %, the lowest over the tasks) keep only runs that measured
    the value and are within the bound (inclusive).
    """

    base: str | None = None
    adapter: str | None = None
    status: RunStatus | None = None
    bits: int | None = None
    group_size: int | None = None
    desc_act: bool | None = None
    config: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    max_kld: float | None = None
    min_top1: float | None = None
    min_task_recovery: float | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in RUN_STATUSES:
            raise CatalogQueryError(
                f"run status {self.status!r} is not one of {', '.join(RUN_STATUSES)}: use one of those"
            )
        if self.since and self.until and aware(self.since) >= aware(self.until):
            raise CatalogQueryError(
                f"date range since {self.since.isoformat()} until {self.until.isoformat()} is empty: "
                f"give a 'since' before 'until'"
            )
        for what, value in (("max KL divergence", self.max_kld), ("min top-1 agreement", self.min_top1),
                            ("min task recovery", self.min_task_recovery)):
            if value is not None and not (isinstance(value, (int, float)) and not math.isnan(value) and value >= 0):
                raise CatalogQueryError(f"{what} {value!r} must be a number >= 0: give e.g. 0.05 or 97%")


def parse_when(text: str, *, end: bool = False) -> datetime:
    """An ISO date or datetime (UTC when no zone); a bare date as an *end* bound means the next midnight."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            day = datetime.combine(date.fromisoformat(text.strip()), datetime.min.time(), tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise CatalogQueryError(
            f"date {text!r} is not an ISO date or datetime: give e.g. 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_percent(text: str | float, *, what: str = "perplexity increase", example: str = "3%") -> float:
    """``'3%'``, ``'3'`` or ``3.0`` → ``3.0`` (a percentage, by default a perplexity increase; *what*
    names it in errors, *example* shows a good value)."""
    raw = str(text).strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError as exc:
        raise CatalogQueryError(f"{what} {text!r} is not a percentage: give e.g. {example} or 2.5") from exc
    if math.isnan(value) or value < 0:
        raise CatalogQueryError(f"{what} {text!r} must be a percentage >= 0: give e.g. {example}")
    return value


def parse_number(text: str | float, *, what: str, example: str) -> float:
    """A number >= 0 (e.g. a KL divergence bound); *what* names it in errors, *example* shows one."""
    try:
        value = float(str(text).strip())
    except ValueError as exc:
        raise CatalogQueryError(f"{what} {text!r} is not a number: give e.g. {example}") from exc
    if math.isnan(value) or value < 0:
        raise CatalogQueryError(f"{what} {text!r} must be a number >= 0: give e.g. {example}")
    return value


def verdict_bounds(*, max_kld: str | float | None = None, min_top1: str | float | None = None,
                   min_task_recovery: str | float | None = None) -> dict[str, float | None]:
    """The verdict filters of :class:`RunFilter` from text as ``ls`` / ``best`` / the API take it
    (``0.05``; ``95`` or ``95%``; ``97%``), parsed and checked."""
    return {
        "max_kld": None if max_kld is None else parse_number(max_kld, what="max KL divergence", example="0.05"),
        "min_top1": None if min_top1 is None else parse_percent(min_top1, what="min top-1 agreement",
                                                                example="95%"),
        "min_task_recovery": None if min_task_recovery is None else parse_percent(
            min_task_recovery, what="min task recovery", example="97%"),
    }


# --------------------------------------------------------------------------- ls


def query_runs(
    catalog: CatalogConnections, *, filters: RunFilter | None = None, sort: SortKey = "newest", limit: int = 50,
    max_limit: int | None = MAX_LIMIT,
) -> list[RunRow]:
    """Runs matching *filters*, ordered by *sort* (:data:`SORTS`; missing values last), at most *limit*
    (which must not exceed *max_limit*, unless that is ``None``)."""
    if sort not in SORTS:
        raise CatalogQueryError(f"sort key {sort!r} is not one of {', '.join(SORTS)}: use one of those")
    if limit < 1 or (max_limit is not None and limit > max_limit):
        bound = f"from 1 to {max_limit}" if max_limit is not None else "of at least 1"
        raise CatalogQueryError(f"cannot list {limit} runs: give a limit {bound}")
    filters = filters or RunFilter()
    column, direction = SORTS[sort]
    with catalog.reading("list runs") as session:
        base_ids: list[int] | None = None
        if filters.base is not None:
            base_ids = version_ids(session, BaseModelVersion, filters.base)
            if not base_ids:
                return []
        # Sorted by a ratio, the runs are read in that order from a (filter, ratio) index and the read
        # stops at the limit; a verdict bound there must not look indexable, or SQLite ranges over
        # the bound's own index and sorts every match instead (see _filtered).
        stmt = _filtered(session, select(*ROW_COLUMNS), filters, base_ids=base_ids,
                         index_bounds=not column.expression.nullable)
        if stmt is None:
            return []
        ties = (Run.started_at.desc(), Run.id.desc())
        order = column.desc() if direction == "desc" else column.asc()
        if not column.expression.nullable:  # started_at, name: one query (indexes lead with each filter)
            return [run_row(r) for r in session.execute(stmt.order_by(order, *ties).limit(limit))]
        # A ratio (missing on unfinished runs, which sort last): the runs that have it, in its order,
        # then, if the page is not full, those without it, newest first. Two queries that an index on
        # (filter column, ratio) / (filter column, started_at) answers in order; one ORDER BY ... NULLS
        # LAST is not (PostgreSQL's default index order puts NULLs first when descending, SQLite's
        # puts them first when ascending), so it would sort every matching run.
        rows = _top(session, stmt.where(column.is_not(None)), (order, *ties), limit, base_ids)
        if len(rows) < limit:
            missing = stmt.where(column.is_(None)).order_by(*ties).limit(limit - len(rows))
            rows += [run_row(r) for r in session.execute(missing)]
        return rows


#: Up to this many base model versions, a base filter is one ordered, limited scan per version.
_MAX_SPLIT_BASES = 32


def _top(session: Session, stmt: Select, order: tuple[Any, ...], limit: int,
         base_ids: list[int] | None) -> list[RunRow]:
    """The first *limit* rows of *stmt* in *order* (a gate ratio, then newest first).

    A base URI usually matches several base model versions (one per commit SHA); ``base_model_id
    IN (...)`` cannot be read in ratio order from the index on (base_model_id, ratio), so every
    matching run would be sorted. Instead: the first *limit* of each version (an index range read in
    order, stopped at *limit*), merged -- UNION ALL of at most ``len(base_ids) * limit`` rows, sorted.
    Newest-first lists do not split: there the planner walks (status, started_at), (config,
    started_at) or started_at newest first and filters, which stops early for any common base; split
    per version, a filter that matches few runs of each would make every part read far.
    """
    if base_ids is None or len(base_ids) == 1 or len(base_ids) > _MAX_SPLIT_BASES:
        return [run_row(r) for r in session.execute(stmt.order_by(*order).limit(limit))]
    parts = [select(stmt.where(Run.base_model_id == base_id).order_by(*order).limit(limit).subquery())
             for base_id in base_ids]
    merged = union_all(*parts).subquery()
    outer = [_on(merged, key) for key in order]
    return [run_row(r) for r in session.execute(select(merged).order_by(*outer).limit(limit))]


def _on(subquery: Any, key: Any) -> Any:
    """The ORDER BY element *key* (``Run.x.asc()`` / ``.desc()``) re-targeted at *subquery*'s column."""
    column = subquery.c[key.element.key]
    return column.desc() if key.modifier is operators.desc_op else column.asc()


def _filtered(session: Session, stmt: Select, filters: RunFilter, *,
              base_ids: list[int] | None = None, index_bounds: bool = True) -> Select | None:
    """*stmt* with the WHERE clauses of *filters*; ``None`` when a base/adapter matches nothing.

    *base_ids*: the base model versions of ``filters.base`` when the caller looked them up already.
    *index_bounds* False: the verdict bounds are spelled ``column + 0 <= value`` (the same test, but no
    index on the column looks usable for it), for reads that an index on another column serves in
    order (a ratio sort) or from the index alone (``best``'s ix_runs_best).
    """
    if filters.base is not None:
        if base_ids is None:
            base_ids = version_ids(session, BaseModelVersion, filters.base)
        if not base_ids:
            return None
        stmt = stmt.where(Run.base_model_id.in_(base_ids))
    if filters.adapter is not None:
        adapter_ids = version_ids(session, AdapterVersion, filters.adapter)
        if not adapter_ids:
            return None
        stmt = stmt.where(Run.id.in_(select(RunAdapter.run_id).where(RunAdapter.adapter_id.in_(adapter_ids))))
    for column, value in ((Run.status, filters.status), (Run.bits, filters.bits),
                          (Run.group_size, filters.group_size), (Run.desc_act, filters.desc_act),
                          (Run.config, filters.config)):
        if value is not None:
            stmt = stmt.where(column == value)
    if filters.since is not None:
        stmt = stmt.where(Run.started_at >= aware(filters.since))
    if filters.until is not None:
        stmt = stmt.where(Run.started_at < aware(filters.until))
    def bounded(column: Any) -> Any:
        return column if index_bounds else column + 0

    if filters.max_kld is not None:
        stmt = stmt.where(bounded(Run.kld_mean) <= filters.max_kld)
    if filters.min_top1 is not None:
        stmt = stmt.where(bounded(Run.top1_agreement_pct) >= filters.min_top1)
    if filters.min_task_recovery is not None:
        stmt = stmt.where(bounded(Run.task_recovery_pct) >= filters.min_task_recovery)
    return stmt


def version_ids(session: Session, model: type, ref: str) -> list[int]:
    """Ids of the base model / adapter versions whose URI is *ref* or whose SHA is (or starts with) it."""
    match: ColumnElement[bool] = or_(model.uri == ref, model.sha == ref)
    if len(ref) >= MIN_SHA_PREFIX and re.fullmatch(r"[0-9a-fA-F]+", ref):
        match = or_(match, model.sha.startswith(ref.lower(), autoescape=True))
    return list(session.scalars(select(model.id).where(match)))


# --------------------------------------------------------------------------- show / compare


def read_run(catalog: CatalogConnections, *, run_id: str) -> RunDetail:
    """Everything about run *run_id* (a unique prefix of at least 6 characters will do)."""
    with catalog.reading(f"read run {run_id!r}") as session:
        full_id = resolve_run_id(session, run_id=run_id, catalog_url=catalog.url)
        run = session.get(Run, full_id, options=DETAIL_LOADS)
        assert run is not None
        return run_detail(run)


def compare_runs(catalog: CatalogConnections, *, run_ids: Sequence[str]) -> Comparison:
    """Runs side by side: every metric (name, side) any of them has, with changes against the first."""
    if not 2 <= len(run_ids) <= MAX_COMPARE:
        raise CatalogQueryError(f"cannot compare {len(run_ids)} runs: give 2 to {MAX_COMPARE} run ids")
    runs = [read_run(catalog, run_id=run_id) for run_id in run_ids]
    ids = [run.id for run in runs]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise CatalogQueryError(f"run {twice[0]} is given twice to compare: give each run once")
    keys: dict[tuple[str, str], str] = {}
    for run in runs:
        for metric in run.metrics:
            keys.setdefault((metric.name, metric.side), metric.unit)
    rows = []
    for (name, side), unit in keys.items():
        values = tuple(run.value(name, side) for run in runs)
        first = values[0]
        change = tuple(
            None if i == 0 or v is None or first is None or first == 0 else (v / first - 1.0) * 100.0
            for i, v in enumerate(values)
        )
        rows.append(ComparedMetric(name=name, side=side, unit=unit, values=values, change_pct=change))
    return Comparison(runs=tuple(runs), metrics=tuple(rows))


# --------------------------------------------------------------------------- best


def best_build(
    catalog: CatalogConnections, *, base: str, max_ppl_increase_pct: float | None = None, by: Objective = "speed",
    filters: RunFilter | None = None,
) -> BestBuild:
    """The Pareto-best passing build of *base*.

    Candidates: runs of *base* with status ``passed`` (gate passed, published), a perplexity
    increase <= *max_ppl_increase_pct* (when given) and the *by* objective measured, narrowed
    by *filters* (config fields, adapter, dates, and the verdict bounds: KL divergence, top-1
    agreement, task recovery). The front keeps every candidate that no other
    beats on both perplexity increase and objective; ``best`` is its point with the best
    objective (ties: lower perplexity increase, then newest). ``best`` is ``None`` without
    candidates. Raises :class:`CatalogNotFoundError` when no run was ever built on *base*.
    """
    if by not in OBJECTIVES:
        raise CatalogQueryError(f"objective {by!r} is not one of {', '.join(OBJECTIVES)}: use one of those")
    if max_ppl_increase_pct is not None:
        max_ppl_increase_pct = parse_percent(max_ppl_increase_pct)
    column, higher_better = OBJECTIVES[by]
    base_filter = RunFilter(**{**_filter_fields(filters), "base": base, "status": None})
    with catalog.reading(f"find the best build of {base!r}") as session:
        base_ids = version_ids(session, BaseModelVersion, base)
        if not base_ids:
            raise CatalogNotFoundError(
                f"no run in the catalog at {catalog.url} was built on base model {base!r}: give its URI "
                f"or commit SHA as `catalog ls` shows it"
            )
        stmt = _filtered(session, select(Run.id, Run.ppl_increase_pct.label("ppl"), column.label("objective"),
                                         Run.started_at), base_filter, base_ids=base_ids, index_bounds=False)
        assert stmt is not None
        # ``status || ''`` and ``objective + 0``: the same tests, but no (status, ...) index looks usable
        # for them -- SQLite without ANALYZE statistics (modelfactory never runs it) would otherwise read
        # every passing run of every base from (status, ppl_increase_pct) instead of ix_runs_best.
        stmt = stmt.where(Run.status.concat("") == "passed", Run.ppl_increase_pct.is_not(None),
                          (column + 0).is_not(None))
        if max_ppl_increase_pct is not None:
            stmt = stmt.where(Run.ppl_increase_pct <= max_ppl_increase_pct)
        front_ids, candidates = _pareto_front(session, stmt, higher_better=higher_better)
        rows = {r.id: r for r in (run_row(x) for x in session.execute(
            select(*ROW_COLUMNS).where(Run.id.in_(front_ids))))} if front_ids else {}
    front = tuple(rows[i] for i in front_ids)
    bounds = {name: getattr(base_filter, name) for name in VERDICT_FILTERS if getattr(base_filter, name) is not None}
    return BestBuild(base=base, by=by, max_ppl_increase_pct=max_ppl_increase_pct, candidates=candidates,
                     best=front[-1] if front else None, front=front, bounds=bounds)


def no_best_message(best: BestBuild, *, relax: str) -> str:
    """Why *best* found no build (its base, every bound it applied), and what to *relax*."""
    bounds = [f"a {best.max_ppl_increase_pct:g}% perplexity increase"] if best.max_ppl_increase_pct is not None else []
    bounds += [f"{BOUND_TEXT[name]} {value:g}{'' if name == 'max_kld' else '%'}" for name, value in best.bounds.items()]
    within = f" within {', '.join(bounds)}" if bounds else ""
    return f"no passing build of {best.base!r}{within} has {best.by} measured: relax {relax}"


#: How a verdict bound reads in messages.
BOUND_TEXT = {"max_kld": "a mean KL divergence <=", "min_top1": "a top-1 agreement >=",
              "min_task_recovery": "a task recovery >="}


@dataclass(frozen=True, slots=True)
class FrontPoint:
    """A candidate build as the Pareto front sees it."""

    id: str
    ppl: float  # perplexity increase, %
    objective: float  # the objective's metric
    started_at: datetime


def pareto_front(points: Sequence[FrontPoint], *, higher_better: bool) -> list[str]:
    """The Pareto front of *points* on (perplexity increase, objective): the one definition, for
    ``catalog best`` and a sweep's winner alike (:func:`_pareto_front` computes the same in SQL).

    In the order perplexity increase ascending, objective best first, newest first, then id (descending),
    a point is on the front when its objective strictly beats that of every point before it. The front
    comes in that order; its last point has the best objective: the best build.
    """
    ordered = sorted(points, key=lambda p: p.id, reverse=True)
    ordered.sort(key=lambda p: (p.ppl, -p.objective if higher_better else p.objective, -aware(p.started_at).timestamp()))
    front: list[str] = []
    best: float | None = None
    for point in ordered:
        if best is None or (point.objective > best if higher_better else point.objective < best):
            front.append(point.id)
            best = point.objective
    return front


def _pareto_front(session: Session, candidates: Select, *, higher_better: bool) -> tuple[list[str], int]:
    """Ids of the Pareto front of *candidates* (id, ppl, objective, started_at) in front order, and
    how many candidates there are -- computed in the database, which returns only the front.

    Definition: :func:`pareto_front`'s (perplexity increase ascending, objective best first, newest
    first, then id; a candidate is on the front when its objective strictly beats that of every
    candidate before it; the last one has the best objective; equal points: the first (newest) joins).

    Four statements, each answered from ``ix_runs_best`` (base model version, status, perplexity
    increase, every objective, started_at, id: no table row is read) or a (base_model_id, objective)
    index:

    1. count, lowest perplexity increase ``p_min``, best objective ``o_best`` (one index-only pass);
    2. ``o_first``: the best objective among candidates at ``p_min`` (the front's first point) and
       ``p_last``: the lowest perplexity increase among candidates at ``o_best`` (its last point);
    3. the front, as a running best (MAX / MIN window over the preceding rows) over the rectangle
       ``ppl <= p_last`` and objective at least as good as ``o_first`` only: a candidate with a higher
       perplexity increase comes after the last front point, one with a worse objective than the
       first point never beats it, and neither changes the running best of the rows kept -- so the
       window sorts a fraction of the candidates, not all of them.
    """
    sub = candidates.subquery()
    best_of = func.max if higher_better else func.min
    count, p_min, o_best = session.execute(
        select(func.count(), func.min(sub.c.ppl), best_of(sub.c.objective))).one()
    if not count:
        return [], 0
    # ``+ 0``: no MIN/MAX-by-index shortcut (walking (status, objective) across every base model);
    # each is a seek on ix_runs_best (ppl = p_min) / on an index (…, objective) (objective = o_best).
    o_first = select(best_of(sub.c.objective + 0)).where(sub.c.ppl == p_min).scalar_subquery()
    p_last = select(func.min(sub.c.ppl + 0)).where(sub.c.objective == o_best).scalar_subquery()
    o_first, p_last = session.execute(select(o_first, p_last)).one()
    kept = candidates.where(Run.ppl_increase_pct <= p_last)
    objective = candidates.selected_columns.objective
    kept = kept.where(objective >= o_first if higher_better else objective <= o_first)
    # MATERIALIZED: the kept rows are read once, by the index range above, rather than SQLite's planner
    # walking the window's ORDER BY from (status, ppl_increase_pct) across every base model.
    c = kept.cte("candidates").prefix_with("MATERIALIZED").c
    objective_first = c.objective.desc() if higher_better else c.objective.asc()
    order = (c.ppl.asc(), objective_first, c.started_at.desc(), c.id.desc())
    running = best_of(c.objective).over(order_by=order, rows=(None, -1))
    ranked = select(c.id, c.ppl, c.objective, c.started_at, running.label("before")).subquery()
    r = ranked.c
    beats = r.objective > r.before if higher_better else r.objective < r.before
    stmt = (select(r.id).where(or_(r.before.is_(None), beats))
            .order_by(r.ppl.asc(), r.objective.desc() if higher_better else r.objective.asc(),
                      r.started_at.desc(), r.id.desc()))
    return list(session.scalars(stmt)), count


def _filter_fields(filters: RunFilter | None) -> dict[str, Any]:
    if filters is None:
        return {}
    return {name: getattr(filters, name) for name in RunFilter.__dataclass_fields__}


# --------------------------------------------------------------------------- lineage


def lineage(catalog: CatalogConnections, *, ref: str) -> Lineage:
    """base SHA → adapters → spec → run → artifacts → publications, for a run id (or prefix),
    an artifact / publication URI, or a manifest sha256."""
    ref = ref.strip()
    with catalog.reading(f"trace the lineage of {ref!r}") as session:
        matched_by, runs = _lineage_runs(session, catalog, ref=ref)
        run = session.get(Run, runs[0], options=[selectinload(Run.artifacts), selectinload(Run.publications),
                                                 selectinload(Run.adapter_links)])
        assert run is not None
        nodes: list[LineageNode] = []
        if run.base_uri or run.base_sha:
            nodes.append(LineageNode("base", run.base_uri or "", run.base_sha))
        links = {link.position: link for link in run.adapter_links}
        for position, adapter in enumerate(run.adapters or []):
            link = links.get(position)
            nodes.append(LineageNode("adapter", adapter.get("uri", ""), adapter.get("sha"), {
                "position": position, "weight": link.weight if link else adapter.get("weight", 1.0)}))
        nodes.append(LineageNode("spec", run.config or "", run.run_key, {
            "bits": run.bits, "group_size": run.group_size, "desc_act": run.desc_act, "spec": run.spec}))
        nodes.append(LineageNode("run", run.id, None, {
            "name": run.name, "status": run.status, "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at), "flow_run_id": run.flow_run_id}))
        manifests = {a.manifest_sha256 for a in run.artifacts if a.manifest_sha256}
        for artifact in run.artifacts:
            nodes.append(LineageNode("artifact", artifact.uri, artifact.manifest_sha256, {
                "kind": artifact.kind, "size_bytes": artifact.size_bytes}))
        publications = list(run.publications)
        if manifests:  # the same artifact published by later runs (or other destinations) too
            seen = {p.id for p in publications}
            publications += [p for p in session.scalars(
                select(Publication).where(Publication.manifest_sha256.in_(manifests)).order_by(Publication.id))
                if p.id not in seen]
        for pub in publications:
            nodes.append(LineageNode("publication", pub.uri, pub.manifest_sha256, {
                "destination": pub.destination, "revision": pub.revision, "commit_sha": pub.commit_sha,
                "reused": pub.reused, "run_id": pub.run_id, "published_at": _iso(pub.published_at)}))
    return Lineage(ref=ref, matched_by=matched_by, run_id=runs[0], runs=tuple(runs), nodes=tuple(nodes))


def _lineage_runs(session: Session, catalog: CatalogConnections, *, ref: str) -> tuple[LineageMatch, list[str]]:
    """How *ref* matched and the runs that produced it, earliest first."""
    by_start = (Run.started_at.asc(), Run.id.asc())
    if _MANIFEST_SHA.fullmatch(ref.lower()):
        sha = ref.lower()
        producers = select(Artifact.run_id).where(Artifact.manifest_sha256 == sha).union(
            select(Publication.run_id).where(Publication.manifest_sha256 == sha))
        runs = list(session.scalars(select(Run.id).where(Run.id.in_(producers)).order_by(*by_start)))
        if runs:
            return "manifest", runs
    if "://" in ref or "/" in ref:
        producers = select(Artifact.run_id).where(Artifact.uri == ref).union(
            select(Publication.run_id).where(Publication.uri == ref))
        runs = list(session.scalars(select(Run.id).where(Run.id.in_(producers)).order_by(*by_start)))
        if runs:
            return "uri", runs
    try:
        return "run", [resolve_run_id(session, run_id=ref, catalog_url=catalog.url)]
    except CatalogNotFoundError as exc:
        raise CatalogNotFoundError(
            f"{ref!r} is no run id, artifact or publication URI, or manifest sha256 in the catalog at "
            f"{catalog.url}: give one as `catalog show` / `catalog ls` print them"
        ) from exc


def _iso(value: datetime | None) -> str | None:
    utc = aware(value)
    return utc.isoformat() if utc else None


# --------------------------------------------------------------------------- leaderboard


def leaderboard(catalog: CatalogConnections, *, base: str | None = None, bases: int = 10,
                rows: int = 100) -> list[Board]:
    """One board per base model (the *bases* with the most recent runs, or just *base*): its
    finished builds with gate ratios, passing first, then by decode speed-up (fastest first)."""
    finished = Run.status.in_(("passed", "rejected"))
    with catalog.reading("build the leaderboard") as session:
        latest = (select(BaseModelVersion.id, BaseModelVersion.uri, BaseModelVersion.sha, func.count(Run.id))
                  .join(Run, Run.base_model_id == BaseModelVersion.id).where(finished)
                  .group_by(BaseModelVersion.id, BaseModelVersion.uri, BaseModelVersion.sha)
                  .order_by(func.max(Run.started_at).desc()).limit(bases))
        if base is not None:
            ids = version_ids(session, BaseModelVersion, base)
            if not ids:
                raise CatalogNotFoundError(
                    f"no run in the catalog at {catalog.url} was built on base model {base!r}: "
                    f"give its URI or commit SHA as `catalog ls` shows it"
                )
            latest = latest.where(BaseModelVersion.id.in_(ids))
        boards = []
        for base_id, uri, sha, count in session.execute(latest).all():
            stmt = (select(*ROW_COLUMNS).where(Run.base_model_id == base_id, finished)
                    .order_by((Run.status == "passed").desc(), Run.decode_speedup.desc().nulls_last(),
                              Run.started_at.desc())
                    .limit(rows))
            boards.append(Board(base_uri=uri, base_sha=sha, runs=int(count),
                                rows=tuple(run_row(r) for r in session.execute(stmt))))
    return boards


__all__ = [
    "MAX_COMPARE",
    "OBJECTIVES",
    "FrontPoint",
    "SORTS",
    "RunFilter",
    "SortKey",
    "best_build",
    "compare_runs",
    "leaderboard",
    "lineage",
    "no_best_message",
    "parse_number",
    "parse_percent",
    "parse_when",
    "pareto_front",
    "query_runs",
    "read_run",
    "verdict_bounds",
]
