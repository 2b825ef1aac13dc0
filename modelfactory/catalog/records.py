"""Plain, immutable records the catalog hands out and takes in.

They decouple callers (tasks, CLI) from the ORM: nothing here touches a session,
and every record turns into JSON-serialisable data with :meth:`to_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Every status a run can have; ``running`` until :meth:`Catalog.finish_run`.
RUN_STATUSES = ("running", "passed", "failed", "rejected")
#: The statuses :meth:`Catalog.finish_run` accepts.
FINAL_RUN_STATUSES = ("passed", "failed", "rejected")
STEP_STATUSES = ("ok", "reused", "failed")
#: Run statuses of webhook deliveries.
DELIVERY_STATUSES = ("accepted", "started", "failed")
WATCH_KINDS = ("adapter", "base")
PUBLICATION_DESTINATIONS = ("file", "s3", "hub")
#: ``''`` marks a metric that belongs to neither model (e.g. a size ratio).
METRIC_SIDES = ("fp16", "gptq", "delta", "")


def _jsonable(value: Any) -> Any:
    """*value* with datetimes as ISO strings, records as dicts and tuples as lists."""
    if isinstance(value, datetime):
        return value.isoformat()
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
    side: str
    value: float
    unit: str = ""


@dataclass(frozen=True, slots=True)
class GateCheckRecord(_Record):
    metric: str
    threshold: float
    baseline: float | None
    candidate: float | None
    observed: float | None
    passed: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class StepRecord(_Record):
    name: str
    status: str
    duration_s: float
    output_uri: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ArtifactRecord(_Record):
    kind: str
    uri: str
    manifest_sha256: str | None
    size_bytes: int


@dataclass(frozen=True, slots=True)
class PublicationRecord(_Record):
    """One destination a run's artifact was published to."""

    destination: str  # file | s3 | hub
    uri: str
    manifest_sha256: str
    size_bytes: int
    revision: str | None = None
    commit_sha: str | None = None
    reused: bool = False
    published_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WatchRecord(_Record):
    """A watched repo: its new commits start the factory (``modelfactory watch``)."""

    repo: str
    kind: str  # adapter | base
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
    status: str
    delivery_id: str | None
    flow_run_id: str | None
    detail: str | None
    received_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunSummary(_Record):
    """One line of ``modelfactory catalog ls``."""

    id: str
    name: str
    status: str
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
    gate_checks: tuple[GateCheckRecord, ...]
    artifacts: tuple[ArtifactRecord, ...]
    publications: tuple[PublicationRecord, ...] = ()

    def metric(self, name: str, side: str = "") -> MetricRecord | None:
        """The metric *name* measured on *side*, or ``None``."""
        return next((m for m in self.metrics if m.name == name and m.side == side), None)

    def value(self, name: str, side: str = "") -> float | None:
        """The value of metric *name* on *side*, or ``None``."""
        metric = self.metric(name, side)
        return metric.value if metric else None

    @property
    def gate_passed(self) -> bool | None:
        """``None`` when no gate was recorded, else whether every check passed."""
        if not self.gate_checks:
            return None
        return all(c.passed for c in self.gate_checks)


def quant_columns(spec: dict[str, Any]) -> dict[str, Any]:
    """The run columns derived from a spec's ``quantize`` part (label as ``QuantSpec.label()``)."""
    quant = spec.get("quantize") or {}
    bits, group = int(quant.get("bits", 4)), int(quant.get("group_size", 128))
    desc_act = bool(quant.get("desc_act", False))
    label = f"gptq-{bits}bit-{'nogroup' if group == -1 else f'{group}g'}" + ("-actorder" if desc_act else "")
    return {"config": label, "bits": bits, "group_size": group, "desc_act": desc_act}


# --------------------------------------------------------------------------- query results


@dataclass(frozen=True, slots=True)
class RunRow(RunSummary):
    """One run as ``catalog ls``, ``best`` and the leaderboard show it: config and gate ratios."""

    bits: int | None
    group_size: int | None
    desc_act: bool | None
    adapters: tuple[dict[str, Any], ...]  # {uri, sha, weight} in merge order
    ppl_increase_pct: float | None
    decode_speedup: float | None
    size_ratio: float | None
    memory_ratio: float | None


@dataclass(frozen=True, slots=True)
class BestBuild(_Record):
    """``catalog best``: the Pareto front of passing builds of one base model, and its best point.

    The front holds the builds no other candidate beats on both perplexity increase (lower is
    better) and the objective (*by*: decode speed-up higher, size or memory ratio lower); it is
    sorted by perplexity increase. ``best`` is the front's point with the best objective.
    """

    base: str
    by: str
    max_ppl_increase_pct: float | None
    candidates: int
    best: RunRow | None
    front: tuple[RunRow, ...]


@dataclass(frozen=True, slots=True)
class ComparedMetric(_Record):
    """One metric (name, side) across the compared runs; deltas are relative to the first run."""

    name: str
    side: str
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

    kind: str
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
    matched_by: str  # run | uri | manifest
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
