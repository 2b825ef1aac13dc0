"""Sweeps in the catalog: a group of ordinary runs, one per quantization configuration, and its winner.

A sweep row (``sweeps``) holds the spec, the objective, the publish mode, the base model version,
the status (``running`` → ``finished`` | ``failed``), the winner's run id and the Pareto front (run
ids). Each configuration is a plain run (started, built, benchmarked and gated like any other)
linked by a ``sweep_members`` row: its label (also its Hub branch), the kernel it was benchmarked
with, its place in the spec and whether it is on the front.

Writes, in the order a sweep makes them: :meth:`~CatalogSweeps.start_sweep`,
:meth:`~CatalogSweeps.set_sweep_base`, :meth:`~CatalogSweeps.add_member` (after the member's
``start_run``), :meth:`~CatalogSweeps.finish_sweep` or :meth:`~CatalogSweeps.fail_sweep` (and, before a retry of an
attempt that did not finish, :meth:`~CatalogSweeps.discard_sweep`). Reads:
:meth:`~CatalogSweeps.get_sweep` (the matrix: :class:`SweepDetail`) and
:meth:`~CatalogSweeps.list_sweeps`; :meth:`~CatalogSweeps.identify` tells whether an id (prefix)
names a run or a sweep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from modelfactory.catalog.connections import CatalogConnections
from modelfactory.catalog.ids import (
    matching_ids,
    require_run_id,
    resolve_run_id,
    resolve_sweep_id,
)
from modelfactory.catalog.mappers import aware
from modelfactory.catalog.models import (
    BaseModelVersion,
    Metric,
    Publication,
    Run,
    Step,
    Sweep,
    SweepMember,
    utcnow,
)
from modelfactory.catalog.queries import MAX_LIMIT, version_ids
from modelfactory.catalog.records import (
    FINAL_SWEEP_STATUSES,
    SWEEP_STATUSES,
    FinalSweepStatus,
    SweepDetail,
    SweepMemberRow,
    SweepStatus,
    SweepSummary,
    check_choice,
)
from modelfactory.catalog.runs import parse_quant, version_id
from modelfactory.core.errors import CatalogNotFoundError, CatalogQueryError
from modelfactory.core.sweep_spec import Objective, PublishMode

#: The ``delta`` metrics a member row carries beyond the gate ratios, when the benchmark measured them.
QUALITY_METRICS = ("kld_mean", "kld_p99", "top1_agreement_pct")
#: ``task_recovery_pct_<task>`` (side ``delta``): the quantized model's task score as % of fp16's.
TASK_RECOVERY_PREFIX = "task_recovery_pct_"
#: The step that records where the GPU stage ran (hostname, CUDA_VISIBLE_DEVICES): ``tasks/record.py``.
GPU_STAGE_STEP = "gpu-stage"

OBJECTIVES: tuple[str, ...] = get_args(Objective)
PUBLISH_MODES: tuple[str, ...] = get_args(PublishMode)


class CatalogSweeps(CatalogConnections):
    """Record a sweep (:meth:`start_sweep` … :meth:`finish_sweep`) and read its matrix back."""

    # ---------------------------------------------------------------- writes

    def start_sweep(
        self,
        *,
        sweep_id: str,
        name: str,
        spec: dict[str, Any],
        objective: Objective,
        publish_mode: PublishMode,
        flow_run_id: str | None = None,
        base_uri: str | None = None,
        base_sha: str | None = None,
    ) -> None:
        """Record a new sweep in status ``running``, created now (UTC); the base when already resolved."""
        check_choice("sweep objective", objective, OBJECTIVES)
        check_choice("sweep publish mode", publish_mode, PUBLISH_MODES)
        if (base_uri is None) != (base_sha is None):
            raise CatalogQueryError(f"sweep {sweep_id!r}: give the base model's URI and commit SHA together")
        with self.writing(f"start sweep {sweep_id!r}") as session:
            sweep = Sweep(id=sweep_id, flow_run_id=flow_run_id, name=name, objective=objective,
                          publish_mode=publish_mode, spec=spec, status="running", created_at=utcnow(), front=[])
            if base_uri is not None and base_sha is not None:
                _set_base(session, sweep, base_uri=base_uri, base_sha=base_sha)
            session.add(sweep)
            try:
                session.flush()
            except IntegrityError as exc:
                raise CatalogQueryError(
                    f"sweep id {sweep_id!r} already exists in the catalog at {self.url}: "
                    f"start every sweep with a fresh id (uuid4)"
                ) from exc

    def set_sweep_base(self, *, sweep_id: str, base_uri: str, base_sha: str) -> None:
        """Record the resolved base model version of a sweep (once it is downloaded)."""
        with self.writing(f"set the base of sweep {sweep_id!r}") as session:
            _set_base(session, self._require(session, sweep_id), base_uri=base_uri, base_sha=base_sha)

    def add_member(
        self, *, sweep_id: str, run_id: str, label: str, kernel: str, position: int | None = None
    ) -> None:
        """Link run *run_id* (already started) to a running sweep as configuration *label*.

        *position*: its place in the spec's declaration order (the matrix's row order); by default
        after the members recorded so far. Members are recorded concurrently, so pass it.
        """
        with self.writing(f"add run {run_id!r} to sweep {sweep_id!r}") as session:
            sweep = self._require(session, sweep_id)
            if sweep.status != "running":
                raise CatalogQueryError(
                    f"sweep {sweep_id!r} is {sweep.status}: members are added while it runs, "
                    f"start a new sweep for more configurations"
                )
            require_run_id(session, run_id=run_id, catalog_url=self.url)
            if position is None:
                last = session.scalar(select(func.max(SweepMember.position)).where(SweepMember.sweep_id == sweep_id))
                position = 0 if last is None else last + 1
            session.add(SweepMember(sweep_id=sweep_id, run_id=run_id, position=position, label=label,
                                    kernel=kernel, on_front=False))
            try:
                session.flush()
            except IntegrityError as exc:
                raise CatalogQueryError(
                    f"sweep {sweep_id!r} already has run {run_id!r} or a member labelled {label!r}: "
                    f"every configuration is one run with a unique label"
                ) from exc

    def finish_sweep(
        self,
        *,
        sweep_id: str,
        winner_run_id: str | None,
        front: Sequence[str],
        status: FinalSweepStatus = "finished",
        error: str | None = None,
        error_kind: str | None = None,
    ) -> None:
        """Close a sweep (finished now, UTC) with its winner (``None``: no configuration passed) and
        Pareto front (run ids of its members; the members' ``on_front`` follows)."""
        check_choice("final sweep status", status, FINAL_SWEEP_STATUSES)
        front = list(dict.fromkeys(front))
        with self.writing(f"finish sweep {sweep_id!r}") as session:
            sweep = self._require(session, sweep_id)
            members = list(session.scalars(select(SweepMember).where(SweepMember.sweep_id == sweep_id)))
            known = {m.run_id for m in members}
            strangers = [r for r in [*front, *([winner_run_id] if winner_run_id else [])] if r not in known]
            if strangers:
                raise CatalogQueryError(
                    f"run {strangers[0]!r} is no member of sweep {sweep_id!r}: the winner and the front "
                    f"are run ids given to add_member"
                )
            for member in members:
                member.on_front = member.run_id in front
            sweep.status, sweep.finished_at = status, utcnow()
            sweep.winner_run_id, sweep.front = winner_run_id, front
            sweep.error, sweep.error_kind = error, error_kind

    def fail_sweep(self, *, sweep_id: str, error: str, error_kind: str | None = None) -> None:
        """Close a sweep that could not finish (finished now, UTC) with the reason; no winner."""
        with self.writing(f"fail sweep {sweep_id!r}") as session:
            sweep = self._require(session, sweep_id)
            sweep.status, sweep.finished_at = "failed", utcnow()
            sweep.winner_run_id = None
            sweep.error, sweep.error_kind = error, error_kind

    def discard_sweep(self, *, sweep_id: str) -> int:
        """Remove the record of sweep *sweep_id* (exactly) whose attempt ended without finishing, so that a
        retry records it afresh under the same id (the on-finetune flow's sweep id is its flow run id:
        ``tasks/record.py``, ``prepare_sweep_retry``, checks that the attempt is over). Its member runs stay
        in the catalog as the runs they are, no longer linked to it. A finished sweep is kept
        (:class:`CatalogQueryError`). Returns how many member links went."""
        with self.writing(f"discard sweep {sweep_id!r}") as session:
            sweep = self._require(session, sweep_id)
            if sweep.status == "finished":
                raise CatalogQueryError(f"sweep {sweep_id!r} finished: its record is kept, start a new sweep instead")
            unlinked = session.execute(delete(SweepMember).where(SweepMember.sweep_id == sweep_id)).rowcount
            session.delete(sweep)
            return unlinked

    # ---------------------------------------------------------------- reads

    def get_sweep(self, sweep_id: str) -> SweepDetail:
        """Everything about sweep *sweep_id* (a unique prefix of at least 6 characters will do)."""
        with self.reading(f"read sweep {sweep_id!r}") as session:
            full_id = resolve_sweep_id(session, sweep_id=sweep_id, catalog_url=self.url)
            sweep = session.get(Sweep, full_id)
            assert sweep is not None
            return SweepDetail(
                id=sweep.id, name=sweep.name, status=sweep.status, objective=sweep.objective,
                publish_mode=sweep.publish_mode, spec=sweep.spec, flow_run_id=sweep.flow_run_id,
                base_uri=sweep.base_uri, base_sha=sweep.base_sha, created_at=aware(sweep.created_at),
                finished_at=aware(sweep.finished_at), winner_run_id=sweep.winner_run_id,
                front=tuple(sweep.front or ()), error_kind=sweep.error_kind, error=sweep.error,
                members=tuple(_member_rows(session, sweep_id=full_id, winner_run_id=sweep.winner_run_id)),
            )

    def list_sweeps(
        self, *, status: SweepStatus | None = None, base: str | None = None, limit: int = 50
    ) -> list[SweepSummary]:
        """Sweeps newest first, optionally only those with *status* / on *base* (URI or commit SHA,
        a 7+ character prefix will do, as for ``catalog ls --base``)."""
        if status is not None:
            check_choice("sweep status", status, SWEEP_STATUSES)
        if not 1 <= limit <= MAX_LIMIT:
            raise CatalogQueryError(f"cannot list {limit} sweeps: give a limit from 1 to {MAX_LIMIT}")
        with self.reading("list sweeps") as session:
            stmt = select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit)
            if status is not None:
                stmt = stmt.where(Sweep.status == status)
            if base is not None:
                base_ids = version_ids(session, BaseModelVersion, base)
                if not base_ids:
                    return []
                stmt = stmt.where(Sweep.base_model_id.in_(base_ids))
            sweeps = list(session.scalars(stmt))
            # Counted for the listed sweeps only (an index range per sweep), not grouped over every member.
            counts = {sweep_id: (members, passed) for sweep_id, members, passed in session.execute(
                select(SweepMember.sweep_id, func.count(), func.count(Run.id).filter(Run.status == "passed"))
                .join(Run, Run.id == SweepMember.run_id)
                .where(SweepMember.sweep_id.in_([s.id for s in sweeps])).group_by(SweepMember.sweep_id))}
            won = [s for s in sweeps if s.winner_run_id]
            winners = {(sweep_id, run_id): label for sweep_id, run_id, label in session.execute(
                select(SweepMember.sweep_id, SweepMember.run_id, SweepMember.label).where(
                    SweepMember.sweep_id.in_([s.id for s in won]),
                    SweepMember.run_id.in_([s.winner_run_id for s in won])))} if won else {}
            return [SweepSummary(id=s.id, name=s.name, status=s.status, objective=s.objective,
                                 publish_mode=s.publish_mode, base_uri=s.base_uri, base_sha=s.base_sha,
                                 created_at=aware(s.created_at), finished_at=aware(s.finished_at),
                                 winner_run_id=s.winner_run_id, winner_label=winners.get((s.id, s.winner_run_id)),
                                 members=counts.get(s.id, (0, 0))[0], passed=counts.get(s.id, (0, 0))[1],
                                 error=s.error)
                    for s in sweeps]

    def running_sweeps(self) -> list[tuple[str, str | None]]:
        """``(sweep id, flow run id)`` of every sweep still ``running``, oldest first (``catalog reconcile``)."""
        with self.reading("list the running sweeps") as session:
            return [(r.id, r.flow_run_id) for r in session.execute(
                select(Sweep.id, Sweep.flow_run_id).where(Sweep.status == "running").order_by(Sweep.created_at))]

    def identify(self, ref: str) -> tuple[Literal["run", "sweep"], str]:
        """Whether *ref* (a full id or a unique 6+ character prefix) names a run or a sweep, and its id.

        Raises :class:`CatalogQueryError` when it matches both a run and a sweep, or several of one
        kind, and :class:`CatalogNotFoundError` when it matches neither.
        """
        with self.reading(f"look up id {ref!r}") as session:
            runs = matching_ids(session, column=Run.id, ref=ref)
            sweeps = matching_ids(session, column=Sweep.id, ref=ref)
            if runs and sweeps:
                raise CatalogQueryError(
                    f"id {ref!r} matches run {runs[0]} and sweep {sweeps[0]}: give more characters of the id"
                )
            if sweeps:
                return "sweep", resolve_sweep_id(session, sweep_id=ref, catalog_url=self.url)
            if runs:
                return "run", resolve_run_id(session, run_id=ref, catalog_url=self.url)
            raise CatalogNotFoundError(
                f"no run or sweep with id {ref!r} in the catalog at {self.url} (prefixes need 6+ characters): "
                f"list them with `modelfactory catalog ls` / `modelfactory catalog sweeps`"
            )

    def _require(self, session: Session, sweep_id: str) -> Sweep:
        """Sweep *sweep_id* (exactly), or :class:`CatalogNotFoundError`: the check before a write."""
        sweep = session.get(Sweep, sweep_id)
        if sweep is None:
            raise CatalogNotFoundError(
                f"no sweep with id {sweep_id!r} in the catalog at {self.url}: call start_sweep first "
                f"(list sweeps with `modelfactory catalog sweeps`)"
            )
        return sweep


def _set_base(session: Session, sweep: Sweep, *, base_uri: str, base_sha: str) -> None:
    sweep.base_uri, sweep.base_sha = base_uri, base_sha
    sweep.base_model_id = version_id(session, BaseModelVersion, uri=base_uri, sha=base_sha)


def _member_rows(session: Session, *, sweep_id: str, winner_run_id: str | None) -> Iterable[SweepMemberRow]:
    """The members of a sweep in declaration order, each with its run's config, verdict and GPU."""
    rows = session.execute(
        select(SweepMember.run_id, SweepMember.label, SweepMember.kernel, SweepMember.position,
               SweepMember.on_front, Run.status, Run.spec, Run.config, Run.bits, Run.group_size, Run.desc_act,
               Run.ppl_increase_pct, Run.size_ratio, Run.decode_speedup, Run.memory_ratio, Run.error, Run.started_at)
        .join(Run, Run.id == SweepMember.run_id).where(SweepMember.sweep_id == sweep_id)
        .order_by(SweepMember.position, SweepMember.id)).all()
    run_ids = [r.run_id for r in rows]
    quality: dict[str, dict[str, float]] = {run_id: {} for run_id in run_ids}
    if run_ids:
        metrics = select(Metric.run_id, Metric.name, Metric.value).where(
            Metric.run_id.in_(run_ids), Metric.side == "delta",
            or_(Metric.name.in_(QUALITY_METRICS), Metric.name.startswith(TASK_RECOVERY_PREFIX, autoescape=True)))
        for run_id, name, value in session.execute(metrics):
            quality[run_id][name] = value
    published: dict[str, str] = {}
    if run_ids:
        for run_id, uri in session.execute(select(Publication.run_id, Publication.uri)
                                           .where(Publication.run_id.in_(run_ids)).order_by(Publication.id)):
            published.setdefault(run_id, uri)
    stages = {run_id: (detail or {}, duration) for run_id, detail, duration in session.execute(
        select(Step.run_id, Step.detail, Step.duration_s).where(Step.run_id.in_(run_ids),
                                                                Step.name == GPU_STAGE_STEP))} if run_ids else {}
    for r in rows:
        quant = parse_quant(r.spec or {})
        measured = quality[r.run_id]
        stage, stage_s = stages.get(r.run_id, ({}, None))
        yield SweepMemberRow(
            run_id=r.run_id, label=r.label, kernel=r.kernel, position=r.position, status=r.status,
            on_front=bool(r.on_front), winner=r.run_id == winner_run_id, config=r.config, bits=r.bits,
            group_size=r.group_size, desc_act=r.desc_act,
            damp_percent=quant.damp_percent if quant else None,
            calibration_samples=quant.calibration.num_samples if quant else None,
            ppl_increase_pct=r.ppl_increase_pct, size_ratio=r.size_ratio, decode_speedup=r.decode_speedup,
            memory_ratio=r.memory_ratio, kld_mean=measured.get("kld_mean"), kld_p99=measured.get("kld_p99"),
            top1_agreement_pct=measured.get("top1_agreement_pct"),
            task_recovery_pct={name.removeprefix(TASK_RECOVERY_PREFIX): value
                               for name, value in sorted(measured.items()) if name.startswith(TASK_RECOVERY_PREFIX)},
            hostname=stage.get("hostname"), cuda_visible_devices=_text(stage.get("cuda_visible_devices")),
            device=_text(stage.get("device")), gpu_stage_s=stage_s, error=r.error, started_at=aware(r.started_at),
            artifact_uri=published.get(r.run_id),
        )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
