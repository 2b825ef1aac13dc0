"""Plain, immutable records the catalog hands out and takes in, and the closed sets of its columns.

They decouple callers (tasks, CLI) from the ORM: nothing here touches a session, and every record
turns into JSON-serialisable data with ``to_dict``. The gate checks and publications a run records
are the step records of :mod:`modelfactory.core.records` themselves (the catalog adds only when a
publication was recorded), so a field is declared once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel

from modelfactory.core.errors import CatalogQueryError
from modelfactory.core.records import GateCheck, Publication
from modelfactory.core.sweep_spec import Objective

# The closed sets below are stored as plain strings (the schema has no enums, so a new value
# needs no migration); ``check_choice`` guards every write against values outside them.

#: Every status a run can have; ``running`` until :meth:`Catalog.finish_run`.
RunStatus = Literal["running", "passed", "failed", "rejected"]
#: The statuses :meth:`Catalog.finish_run` accepts.
FinalRunStatus = Literal["passed", "failed", "rejected"]
StepStatus = Literal["ok", "reused", "failed"]
#: Run statuses of webhook deliveries.
DeliveryStatus = Literal["accepted", "started", "failed"]
WatchKind = Literal["adapter", "base"]
#: ``''`` marks a metric that belongs to neither model (e.g. a size ratio).
MetricSide = Literal["fp16", "gptq", "delta", ""]
#: Every status a sweep can have; ``running`` until :meth:`Catalog.finish_sweep` / :meth:`Catalog.fail_sweep`.
SweepStatus = Literal["running", "finished", "failed"]
#: The statuses :meth:`Catalog.finish_sweep` accepts.
FinalSweepStatus = Literal["finished", "failed"]
#: Links of a lineage chain, in chain order.
LineageKind = Literal["base", "adapter", "spec", "run", "artifact", "publication"]
#: How :func:`~modelfactory.catalog.queries.lineage` matched its reference.
LineageMatch = Literal["run", "uri", "manifest"]

RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
FINAL_RUN_STATUSES: tuple[str, ...] = get_args(FinalRunStatus)
STEP_STATUSES: tuple[str, ...] = get_args(StepStatus)
DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)
WATCH_KINDS: tuple[str, ...] = get_args(WatchKind)
METRIC_SIDES: tuple[str, ...] = get_args(MetricSide)
SWEEP_STATUSES: tuple[str, ...] = get_args(SweepStatus)
FINAL_SWEEP_STATUSES: tuple[str, ...] = get_args(FinalSweepStatus)
#: Where a publication went: the destinations :class:`~modelfactory.core.records.Publication` allows.
PUBLICATION_DESTINATIONS: tuple[str, ...] = get_args(Publication.model_fields["destination"].annotation)


def check_choice(what: str, value: str, allowed: Iterable[str]) -> None:
    """Raise :class:`CatalogQueryError` unless *value* is one of *allowed* (*what* names the field)."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise CatalogQueryError(f"{what} {value!r} is not one of {choices}: use one of those")


def _jsonable(value: Any) -> Any:
    """*value* with datetimes as ISO strings, records as dicts and tuples as lists."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Publication):
        return publication_dict(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict()  # type: ignore[union-attr]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Record:
    """Mixin giving every record the same ``to_dict``."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields}


@dataclass(frozen=True, slots=True)
class MetricRecord(_Record):
    name: str
    side: MetricSide
    value: float
    unit: str = ""


#: The gate's checks are recorded as the gate step decided them (the name stays for callers).
GateCheckRecord = GateCheck


@dataclass(frozen=True, slots=True)
class StepRecord(_Record):
    name: str
    status: StepStatus
    duration_s: float
    output_uri: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ArtifactRecord(_Record):
    kind: str
    uri: str
    manifest_sha256: str | None
    size_bytes: int


def publication_dict(publication: Publication) -> dict[str, Any]:
    """A publication's JSON (the API, ``catalog show --format json``): the Hub commit is ``commit_sha``,
    the name of the catalog's column."""
    return {("commit_sha" if name == "commit" else name): value
            for name, value in publication.model_dump(mode="json").items()}


@dataclass(frozen=True, slots=True)
class WatchRecord(_Record):
    """A watched repo: its new commits start the factory (``modelfactory watch``)."""

    repo: str
    kind: WatchKind
    base: str | None
    revision: str
    spec: dict[str, Any]
    last_sha: str | None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeliveryRecord(_Record):
    """An accepted webhook delivery (one per repo + commit SHA)."""

    repo: str
    sha: str
    event: str
    status: DeliveryStatus
    delivery_id: str | None
    flow_run_id: str | None
    detail: str | None
    received_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunSummary(_Record):
    """One line of ``modelfactory catalog ls``."""

    id: str
    name: str
    status: RunStatus
    run_key: str
    base_uri: str | None
    base_sha: str | None
    started_at: datetime
    finished_at: datetime | None
    error: str | None
    config: str | None  # quantization label, e.g. gptq-4bit-128g

    @property
    def duration_s(self) -> float | None:
        """Wall time of a finished run, ``None`` while it runs."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class RunDetail(RunSummary):
    """Everything the catalog knows about one run (a :class:`RunSummary` plus its children)."""

    spec: dict[str, Any]
    adapters: list[dict[str, Any]]
    library_versions: dict[str, Any]
    host: dict[str, Any]
    error_kind: str | None
    steps: tuple[StepRecord, ...]
    metrics: tuple[MetricRecord, ...]
    gate_checks: tuple[GateCheck, ...]
    artifacts: tuple[ArtifactRecord, ...]
    publications: tuple[Publication, ...] = ()

    def metric(self, name: str, side: MetricSide = "") -> MetricRecord | None:
        """The metric *name* measured on *side*, or ``None``."""
        return next((m for m in self.metrics if m.name == name and m.side == side), None)

    def value(self, name: str, side: MetricSide = "") -> float | None:
        """The value of metric *name* on *side*, or ``None``."""
        metric = self.metric(name, side)
        return metric.value if metric else None

    @property
    def gate_passed(self) -> bool | None:
        """``None`` when no gate was recorded, else whether every check passed."""
        if not self.gate_checks:
            return None
        return all(c.passed for c in self.gate_checks)


# --------------------------------------------------------------------------- query results


@dataclass(frozen=True, slots=True)
class RunRow(RunSummary):
    """One run as ``catalog ls``, ``best`` and the leaderboard show it: config, gate ratios and the
    verdict's quality measures (``None`` when not measured, e.g. runs recorded before they existed)."""

    bits: int | None
    group_size: int | None
    desc_act: bool | None
    adapters: tuple[dict[str, Any], ...]  # {uri, sha, weight} in merge order
    ppl_increase_pct: float | None
    decode_speedup: float | None
    size_ratio: float | None
    memory_ratio: float | None
    kld_mean: float | None = None  # KL(fp16 || GPTQ) per token, mean (nats)
    top1_agreement_pct: float | None = None  # % of positions where both pick the same next token
    task_recovery_pct: float | None = None  # GPTQ task score as % of fp16's, lowest over the tasks


@dataclass(frozen=True, slots=True)
class BestBuild(_Record):
    """``catalog best``: the Pareto front of passing builds of one base model, and its best point.

    The front holds the builds no other candidate beats on both perplexity increase (lower is
    better) and the objective (*by*: decode speed-up higher, size or memory ratio lower); it is
    sorted by perplexity increase. ``best`` is the front's point with the best objective.
    """

    base: str
    by: Objective
    max_ppl_increase_pct: float | None
    candidates: int
    best: RunRow | None
    front: tuple[RunRow, ...]
    #: The verdict bounds the candidates met (``max_kld``, ``min_top1``, ``min_task_recovery``), as given.
    bounds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ComparedMetric(_Record):
    """One metric (name, side) across the compared runs; deltas are relative to the first run."""

    name: str
    side: MetricSide
    unit: str
    values: tuple[float | None, ...]
    #: ``(value / first - 1) * 100`` per run (``None`` for the first run or a missing value).
    change_pct: tuple[float | None, ...]


@dataclass(frozen=True, slots=True)
class Comparison(_Record):
    runs: tuple[RunDetail, ...]
    metrics: tuple[ComparedMetric, ...]


@dataclass(frozen=True, slots=True)
class LineageNode(_Record):
    """One link of a lineage chain: ``base`` → ``adapter``… → ``spec`` → ``run`` → ``artifact`` → ``publication``."""

    kind: LineageKind
    ref: str  # URI, run id or spec label
    sha: str | None = None  # commit SHA, content hash or manifest sha256
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Lineage(_Record):
    """Where an artifact came from and where it went.

    *ref* was resolved as a run id, an artifact/publication URI or a manifest sha256 (*matched_by*);
    ``run_id`` is the run the chain follows (for an artifact: the earliest run that produced it),
    ``runs`` every run that produced the same artifact (reruns reuse it).
    """

    ref: str
    matched_by: LineageMatch
    run_id: str
    runs: tuple[str, ...]
    nodes: tuple[LineageNode, ...]


@dataclass(frozen=True, slots=True)
class Board(_Record):
    """The leaderboard of one base model: its finished builds, passing ones first, fastest first."""

    base_uri: str
    base_sha: str
    runs: int  # finished builds of this base (the rows may be capped)
    rows: tuple[RunRow, ...]


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True, slots=True)
class SweepMemberRow(_Record):
    """One configuration of a sweep as its matrix shows it: the run's config and verdict, where it ran,
    where it was published. (The other sweep-member type is the configuration itself,
    :class:`~modelfactory.core.sweep_spec.SweepMember`.)

    The quality metrics beyond the gate ratios are read generically from the run's ``delta``
    metrics when the benchmark measured them (``kld_mean``, ``kld_p99``, ``top1_agreement_pct``,
    ``task_recovery_pct_<task>``: ``task_recovery_pct`` maps task → %). ``hostname`` /
    ``cuda_visible_devices`` / ``device`` come from the run's ``gpu-stage`` step (``None`` when the
    stage ran in the factory process).
    """

    run_id: str
    label: str  # the configuration's name and the Hub branch it publishes to
    kernel: str
    position: int
    status: RunStatus
    on_front: bool
    winner: bool
    config: str | None
    bits: int | None
    group_size: int | None
    desc_act: bool | None
    damp_percent: float | None
    calibration_samples: int | None
    ppl_increase_pct: float | None
    size_ratio: float | None
    decode_speedup: float | None
    memory_ratio: float | None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agreement_pct: float | None = None
    task_recovery_pct: dict[str, float] = dataclasses.field(default_factory=dict)
    hostname: str | None = None
    cuda_visible_devices: str | None = None
    device: str | None = None
    gpu_stage_s: float | None = None
    error: str | None = None
    #: When its run started (the Pareto front's last tie-break: newest first, as ``catalog best``).
    started_at: datetime | None = None
    #: Where it was published (its run's first publication), ``None`` when it was not.
    artifact_uri: str | None = None

    @property
    def published(self) -> bool:
        return self.artifact_uri is not None


@dataclass(frozen=True, slots=True)
class SweepSummary(_Record):
    """One line of ``modelfactory catalog sweeps``."""

    id: str
    name: str
    status: SweepStatus
    objective: str
    publish_mode: str
    base_uri: str | None
    base_sha: str | None
    created_at: datetime
    finished_at: datetime | None
    winner_run_id: str | None
    winner_label: str | None
    members: int
    passed: int
    error: str | None


@dataclass(frozen=True, slots=True)
class SweepDetail(_Record):
    """Everything about one sweep: its spec, verdict and one :class:`SweepMemberRow` per configuration
    (declaration order)."""

    id: str
    name: str
    status: SweepStatus
    objective: str
    publish_mode: str
    spec: dict[str, Any]
    flow_run_id: str | None
    base_uri: str | None
    base_sha: str | None
    created_at: datetime
    finished_at: datetime | None
    winner_run_id: str | None
    front: tuple[str, ...]  # run ids
    error_kind: str | None
    error: str | None
    members: tuple[SweepMemberRow, ...]

    @property
    def winner(self) -> SweepMemberRow | None:
        """The winning member, ``None`` before the sweep finished or when none passed."""
        return next((m for m in self.members if m.winner), None)
