"""The catalog queries people use: filtered run lists, comparisons, the best build, lineage.

Pure functions over a :class:`~modelfactory.catalog.Catalog`: they read, never write, and
return the plain records of :mod:`modelfactory.catalog.records`; the CLI, the JSON API and
the leaderboard page only render them. Bad input raises :class:`CatalogQueryError`, a missing
run / artifact / base model :class:`CatalogNotFoundError`.

>>> query_runs(catalog, filters=RunFilter(base="org/base", status="passed", bits=4), sort="speed")
>>> best_build(catalog, base="org/base", max_ppl_increase_pct=3.0, by="speed").best
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.orm import Session, selectinload

from modelfactory.catalog.db import Catalog, _aware
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
    Board,
    BestBuild,
    ComparedMetric,
    Comparison,
    Lineage,
    LineageNode,
    RunDetail,
    RunRow,
)
from modelfactory.errors import CatalogNotFoundError, CatalogQueryError

#: ``sort`` keys of :func:`query_runs` (each in its natural direction; ties: newest first).
SORTS = {
    "newest": (Run.started_at, "desc"),
    "oldest": (Run.started_at, "asc"),
    "ppl": (Run.ppl_increase_pct, "asc"),
    "speed": (Run.decode_speedup, "desc"),
    "size": (Run.size_ratio, "asc"),
    "memory": (Run.memory_ratio, "asc"),
    "name": (Run.name, "asc"),
}
#: ``by`` objectives of :func:`best_build`: the column and whether higher is better.
OBJECTIVES = {"speed": (Run.decode_speedup, True), "size": (Run.size_ratio, False), "memory": (Run.memory_ratio, False)}
MAX_LIMIT = 10_000
MAX_COMPARE = 20
#: Shortest SHA prefix that matches a base model / adapter commit.
MIN_SHA_PREFIX = 7
_MANIFEST_SHA = re.compile(r"[0-9a-f]{64}")
_ROW_COLUMNS = (
    Run.id, Run.name, Run.status, Run.run_key, Run.base_uri, Run.base_sha, Run.started_at, Run.finished_at,
    Run.error, Run.config, Run.bits, Run.group_size, Run.desc_act, Run.adapters, Run.ppl_increase_pct,
    Run.decode_speedup, Run.size_ratio, Run.memory_ratio,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFilter:
    """Filters of ``catalog ls`` / ``GET /api/runs``; every given one must hold (AND).

    *base* and *adapter* match a URI exactly or a commit SHA (a prefix of 7+ characters will do);
    *since* is inclusive, *until* exclusive (a date-only value from :func:`parse_when` covers the day).
    """

    base: str | None = None
    adapter: str | None = None
    status: str | None = None
    bits: int | None = None
    group_size: int | None = None
    desc_act: bool | None = None
    config: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in RUN_STATUSES:
            raise CatalogQueryError(
                f"run status {self.status!r} is not one of {', '.join(RUN_STATUSES)}: use one of those"
            )
        if self.since and self.until and _aware(self.since) >= _aware(self.until):
            raise CatalogQueryError(
                f"date range since {self.since.isoformat()} until {self.until.isoformat()} is empty: "
                f"give a 'since' before 'until'"
            )


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


def parse_percent(text: str | float) -> float:
    """``'3%'``, ``'3'`` or ``3.0`` → ``3.0`` (a perplexity increase in percent)."""
    raw = str(text).strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError as exc:
        raise CatalogQueryError(f"perplexity increase {text!r} is not a percentage: give e.g. 3% or 2.5") from exc
    if value != value or value < 0:
        raise CatalogQueryError(f"perplexity increase {text!r} must be a percentage >= 0: give e.g. 3%")
    return value


# --------------------------------------------------------------------------- ls


def query_runs(
    catalog: Catalog, *, filters: RunFilter | None = None, sort: str = "newest", limit: int = 50
) -> list[RunRow]:
    """Runs matching *filters*, ordered by *sort* (:data:`SORTS`; missing values last), at most *limit*."""
    if sort not in SORTS:
        raise CatalogQueryError(f"sort key {sort!r} is not one of {', '.join(SORTS)}: use one of those")
    if not 1 <= limit <= MAX_LIMIT:
        raise CatalogQueryError(f"cannot list {limit} runs: give a limit from 1 to {MAX_LIMIT}")
    filters = filters or RunFilter()
    column, direction = SORTS[sort]
    with catalog.reading("list runs") as session:
        stmt = _filtered(session, select(*_ROW_COLUMNS), filters)
        if stmt is None:
            return []
        order = column.desc() if direction == "desc" else column.asc()
        if column.expression.nullable:  # ratios of unfinished runs; started_at keeps its index order
            order = order.nulls_last()
        stmt = stmt.order_by(order, Run.started_at.desc(), Run.id.desc()).limit(limit)
        return [_row(r) for r in session.execute(stmt)]


def _filtered(session: Session, stmt: Select, filters: RunFilter) -> Select | None:
    """*stmt* with the WHERE clauses of *filters*; ``None`` when a base/adapter matches nothing."""
    if filters.base is not None:
        base_ids = _version_ids(session, BaseModelVersion, filters.base)
        if not base_ids:
            return None
        stmt = stmt.where(Run.base_model_id.in_(base_ids))
    if filters.adapter is not None:
        adapter_ids = _version_ids(session, AdapterVersion, filters.adapter)
        if not adapter_ids:
            return None
        stmt = stmt.where(Run.id.in_(select(RunAdapter.run_id).where(RunAdapter.adapter_id.in_(adapter_ids))))
    for column, value in ((Run.status, filters.status), (Run.bits, filters.bits),
                          (Run.group_size, filters.group_size), (Run.desc_act, filters.desc_act),
                          (Run.config, filters.config)):
        if value is not None:
            stmt = stmt.where(column == value)
    if filters.since is not None:
        stmt = stmt.where(Run.started_at >= _aware(filters.since))
    if filters.until is not None:
        stmt = stmt.where(Run.started_at < _aware(filters.until))
    return stmt


def _version_ids(session: Session, model: type, ref: str) -> list[int]:
    """Ids of the base model / adapter versions whose URI is *ref* or whose SHA is (or starts with) it."""
    match: ColumnElement[bool] = or_(model.uri == ref, model.sha == ref)
    if len(ref) >= MIN_SHA_PREFIX and re.fullmatch(r"[0-9a-fA-F]+", ref):
        match = or_(match, model.sha.startswith(ref.lower(), autoescape=True))
    return list(session.scalars(select(model.id).where(match)))


def _row(r: Any) -> RunRow:
    return RunRow(
        id=r.id, name=r.name, status=r.status, run_key=r.run_key, base_uri=r.base_uri, base_sha=r.base_sha,
        started_at=_aware(r.started_at), finished_at=_aware(r.finished_at), error=r.error, config=r.config,
        bits=r.bits, group_size=r.group_size, desc_act=r.desc_act,
        adapters=tuple(dict(a) for a in (r.adapters or [])), ppl_increase_pct=r.ppl_increase_pct,
        decode_speedup=r.decode_speedup, size_ratio=r.size_ratio, memory_ratio=r.memory_ratio,
    )


# --------------------------------------------------------------------------- show / compare


def get_run(catalog: Catalog, run_id: str) -> RunDetail:
    """Everything about one run (id or a unique 6+ character prefix)."""
    return catalog.get_run(run_id)


def compare_runs(catalog: Catalog, run_ids: Sequence[str]) -> Comparison:
    """Runs side by side: every metric (name, side) any of them has, with changes against the first."""
    if not 2 <= len(run_ids) <= MAX_COMPARE:
        raise CatalogQueryError(f"cannot compare {len(run_ids)} runs: give 2 to {MAX_COMPARE} run ids")
    runs = [catalog.get_run(run_id) for run_id in run_ids]
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
    catalog: Catalog, *, base: str, max_ppl_increase_pct: float | None = None, by: str = "speed",
    filters: RunFilter | None = None,
) -> BestBuild:
    """The Pareto-best passing build of *base*.

    Candidates: runs of *base* with status ``passed`` (gate passed, published), a perplexity
    increase <= *max_ppl_increase_pct* (when given) and the *by* objective measured, narrowed
    by *filters* (config fields, adapter, dates). The front keeps every candidate that no other
    beats on both perplexity increase and objective; ``best`` is its point with the best
    objective (ties: lower perplexity increase, then newest). ``best`` is ``None`` without
    candidates. Raises :class:`CatalogNotFoundError` when no run was ever built on *base*.
    """
    if by not in OBJECTIVES:
        raise CatalogQueryError(f"objective {by!r} is not one of {', '.join(OBJECTIVES)}: use one of those")
    if max_ppl_increase_pct is not None:
        max_ppl_increase_pct = parse_percent(max_ppl_increase_pct)
    column, higher_better = OBJECTIVES[by]
    base_filter = RunFilter(**{**_filter_fields(filters), "base": base, "status": "passed"})
    with catalog.reading(f"find the best build of {base!r}") as session:
        if not _version_ids(session, BaseModelVersion, base):
            raise CatalogNotFoundError(
                f"no run in the catalog at {catalog.url} was built on base model {base!r}: give its URI "
                f"or commit SHA as `catalog ls` shows it"
            )
        stmt = _filtered(session, select(Run.id, Run.ppl_increase_pct, column), base_filter)
        assert stmt is not None
        stmt = stmt.where(Run.ppl_increase_pct.is_not(None), column.is_not(None))
        if max_ppl_increase_pct is not None:
            stmt = stmt.where(Run.ppl_increase_pct <= max_ppl_increase_pct)
        objective_order = column.desc() if higher_better else column.asc()
        stmt = stmt.order_by(Run.ppl_increase_pct.asc(), objective_order, Run.started_at.desc())
        candidates = session.execute(stmt).all()
        front_ids = _pareto_front([(r[0], r[2]) for r in candidates], higher_better=higher_better)
        rows = {r.id: r for r in (_row(x) for x in session.execute(
            select(*_ROW_COLUMNS).where(Run.id.in_(front_ids))))} if front_ids else {}
    front = tuple(rows[i] for i in front_ids)
    return BestBuild(base=base, by=by, max_ppl_increase_pct=max_ppl_increase_pct, candidates=len(candidates),
                     best=front[-1] if front else None, front=front)


def _pareto_front(points: Sequence[tuple[str, float]], *, higher_better: bool) -> list[str]:
    """Ids of the front of *points* (sorted by perplexity increase, then objective best first).

    A point joins when its objective strictly beats every point with a lower or equal perplexity
    increase; the last one joined has the best objective.
    """
    front: list[str] = []
    best: float | None = None
    for run_id, objective in points:
        value = objective if higher_better else -objective
        if best is None or value > best:
            front.append(run_id)
            best = value
    return front


def _filter_fields(filters: RunFilter | None) -> dict[str, Any]:
    if filters is None:
        return {}
    return {name: getattr(filters, name) for name in RunFilter.__dataclass_fields__}


# --------------------------------------------------------------------------- lineage


def lineage(catalog: Catalog, ref: str) -> Lineage:
    """base SHA → adapters → spec → run → artifacts → publications, for a run id (or prefix),
    an artifact / publication URI, or a manifest sha256."""
    ref = ref.strip()
    with catalog.reading(f"trace the lineage of {ref!r}") as session:
        matched_by, runs = _lineage_runs(session, catalog, ref)
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


def _lineage_runs(session: Session, catalog: Catalog, ref: str) -> tuple[str, list[str]]:
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
        return "run", [catalog.resolve_id(session, ref)]
    except CatalogNotFoundError as exc:
        raise CatalogNotFoundError(
            f"{ref!r} is no run id, artifact or publication URI, or manifest sha256 in the catalog at "
            f"{catalog.url}: give one as `catalog show` / `catalog ls` print them"
        ) from exc


def _iso(value: datetime | None) -> str | None:
    aware = _aware(value)
    return aware.isoformat() if aware else None


# --------------------------------------------------------------------------- leaderboard


def leaderboard(catalog: Catalog, *, base: str | None = None, bases: int = 10, rows: int = 100) -> list[Board]:
    """One board per base model (the *bases* with the most recent runs, or just *base*): its
    finished builds with gate ratios, passing first, then by decode speed-up (fastest first)."""
    finished = Run.status.in_(("passed", "rejected"))
    with catalog.reading("build the leaderboard") as session:
        latest = (select(BaseModelVersion.id, BaseModelVersion.uri, BaseModelVersion.sha, func.count(Run.id))
                  .join(Run, Run.base_model_id == BaseModelVersion.id).where(finished)
                  .group_by(BaseModelVersion.id, BaseModelVersion.uri, BaseModelVersion.sha)
                  .order_by(func.max(Run.started_at).desc()).limit(bases))
        if base is not None:
            ids = _version_ids(session, BaseModelVersion, base)
            if not ids:
                raise CatalogNotFoundError(
                    f"no run in the catalog at {catalog.url} was built on base model {base!r}: "
                    f"give its URI or commit SHA as `catalog ls` shows it"
                )
            latest = latest.where(BaseModelVersion.id.in_(ids))
        boards = []
        for base_id, uri, sha, count in session.execute(latest).all():
            stmt = (select(*_ROW_COLUMNS).where(Run.base_model_id == base_id, finished)
                    .order_by((Run.status == "passed").desc(), Run.decode_speedup.desc().nulls_last(),
                              Run.started_at.desc())
                    .limit(rows))
            boards.append(Board(base_uri=uri, base_sha=sha, runs=int(count),
                                rows=tuple(_row(r) for r in session.execute(stmt))))
    return boards


__all__ = [
    "MAX_COMPARE",
    "OBJECTIVES",
    "SORTS",
    "RunFilter",
    "best_build",
    "compare_runs",
    "get_run",
    "leaderboard",
    "lineage",
    "parse_percent",
    "parse_when",
    "query_runs",
]
