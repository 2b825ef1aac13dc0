"""The sweep flow: one merged model, N quantization configurations, one winner.

1. download + merge **once**; the sweep is recorded (``start_sweep``, ``set_sweep_base``);
2. the fp16 side measured **once** (``benchmark_baseline``): in this process, or as a baseline-only
   ``gpu-stage`` run on the pool when ``MODELFACTORY_GPU_DEPLOYMENT`` is set;
3. every member **concurrently**, each its own catalog run of ``spec.member_spec(member)`` (linked
   with ``add_member`` as it starts): quantize + the GPTQ side against the shared baseline + gate —
   one ``gpu-stage`` run per member on the pool (its slots bound the concurrency), else Prefect
   task concurrency in this process (:func:`~modelfactory.sweeps.outcome.local_member_slots`).
   A member whose step fails is recorded failed; the others go on;
4. the Pareto front and the objective's winner among the passing members; publish the winner,
   every passing member (each on its own branch: its label) or none, with the sweep's matrix in
   the model card; ``finish_sweep``; the matrix as a Prefect markdown artifact (``sweep-<id8>``).
   Any other error fails the sweep (``fail_sweep``) and is raised.

A sweep of one configuration is a plain run: its one member run has the plain factory's spec
(``member_spec``), steps, step keys (outputs are shared with plain runs both ways), gate and
publication (the one passing member is the winner, published to its label's branch, which is the
plain run's default branch); the sweep around it only adds the group row.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from modelfactory.flows.factory import _gpu_stage_on_pool
from modelfactory import stage_store
from modelfactory.benchmark.runnability import RunnabilityReport
from modelfactory.catalog import Catalog, claims, open_catalog
from modelfactory.reports import sweep_matrix_markdown
from modelfactory.core.devices import resolve_device
from modelfactory.core.errors import error_kind
from modelfactory.core.hashing import step_key
from modelfactory.core.log import get_logger, progress
from modelfactory.core.records import (
    AdapterArtifact,
    BaselineResult,
    BenchmarkResult,
    GateDecision,
    MergeResult,
    ModelArtifact,
    QuantResult,
)
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import FactorySpec
from modelfactory.core.sweep_spec import MAX_MEMBERS, SweepMember, SweepSpec
from modelfactory.gpu_pool import dispatch_gpu_stage
from modelfactory.sweeps import choose_winner, pareto_front
from modelfactory.sweeps.outcome import (
    MemberStatus,
    SweepMemberOutcome,
    SweepOutcome,
    decided,
    local_member_slots,
    member_scores,
    to_publish,
)
from modelfactory.tasks.benchmark import benchmark_baseline_task, benchmark_candidate_task
from modelfactory.tasks.download import download_task, resolve_adapter_task
from modelfactory.tasks.gate import decide_before_benchmark, gate_task
from modelfactory.tasks.merge import merge_task
from modelfactory.tasks.publish import publish_task
from modelfactory.tasks.quantize import quantize_task, resolve_group_size
from modelfactory.tasks.record import RunRecorder
from modelfactory.tasks.runnability import runnability_task


@dataclass(frozen=True)
class _Built:
    """One member after its gate (or its failure); its run stays open while it passed."""

    member: SweepMember
    spec: FactorySpec
    run_id: str
    status: MemberStatus
    quant: QuantResult | None = None
    bench: BenchmarkResult | None = None
    decision: GateDecision | None = None
    runnability: RunnabilityReport | None = None
    error: str | None = None


@flow(name="sweep", log_prints=True, validate_parameters=True,
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_MEMBERS))
def sweep(spec: SweepSpec, sweep_id: str | None = None) -> SweepOutcome:
    """Quantize one (fine-tuned) model in several GPTQ configurations, keep the best, publish it."""
    sweep_id = sweep_id or str(uuid.uuid4())
    catalog = open_catalog()
    catalog.start_sweep(sweep_id=sweep_id, name=spec.name, spec=spec.model_dump(mode="json"),
                        objective=spec.objective, publish_mode=spec.publish_mode, flow_run_id=runtime.flow_run.id)
    open_runs: dict[str, RunRecorder] = {}  # passing members' runs, closed once published (or not)
    try:
        return _sweep(spec, sweep_id, catalog, open_runs)
    except BaseException as exc:
        for recorder in open_runs.values():
            recorder.fail(exc)
        try:
            catalog.fail_sweep(sweep_id=sweep_id, error=str(exc) or repr(exc), error_kind=error_kind(exc))
        except Exception as record_exc:  # noqa: BLE001 - report, keep the original error
            get_logger().error(f"could not record the failure of sweep {sweep_id}: {record_exc}")
        _matrix_artifact(catalog, sweep_id)
        raise


def _sweep(spec: SweepSpec, sweep_id: str, catalog: Catalog, open_runs: dict[str, RunRecorder]) -> SweepOutcome:
    base = download_task(spec.base, spec.trust_remote_code)
    catalog.set_sweep_base(sweep_id=sweep_id, base_uri=base.source_uri, base_sha=base.sha)
    adapters = tuple(resolve_adapter_task(adapter) for adapter in spec.adapters)
    merged = merge_task(base, adapters, spec.merge)
    # 'auto' group sizes resolved for this model before labelling: 'auto' and its size are one member.
    merged_path = str(stage_store.resolve(merged.model.path))
    members = spec.members(resolve=lambda config: resolve_group_size(config, merged_path))
    deployment = get_settings().gpu_deployment
    progress(f"sweep {sweep_id}: {len(members)} configurations of {base.source_uri} "
             f"({'on the GPU pool ' + deployment if deployment else 'in this process'})")

    baseline = _baseline(merged.model, spec, sweep_id=sweep_id, deployment=deployment)
    progress(f"sweep {sweep_id}: fp16 side {'reused' if baseline.reused else 'measured'} once: {baseline.path}")

    # Local steps share this host: a semaphore bounds them. On the pool its slots do.
    slots = (contextlib.nullcontext() if deployment
             else threading.BoundedSemaphore(local_member_slots(resolve_device(spec.benchmark.device))))
    futures = [member_task.with_options(task_run_name=f"member-{member.label}").submit(
        spec=spec.member_spec(member), member=member, position=position, sweep_id=sweep_id, base=base,
        adapters=adapters, merged=merged, baseline=baseline, deployment=deployment, slots=slots)
        for position, member in enumerate(members)]
    built = [future.result() for future in futures]
    for b in built:
        if b.status == "passed":
            open_runs[b.run_id] = RunRecorder(catalog, b.run_id)

    # Choose on the catalog's view: the ratios and quality metrics exactly as recorded.
    detail = catalog.get_sweep(sweep_id)
    scores = member_scores(detail, passed={b.run_id: b.status == "passed" for b in built})
    front_labels = pareto_front(scores)
    winner_label = choose_winner(scores, objective=spec.objective)
    by_label = {b.member.label: b for b in built}
    front = [by_label[label].run_id for label in front_labels]
    winner = by_label[winner_label] if winner_label is not None else None
    matrix = sweep_matrix_markdown(decided(detail, winner_run_id=winner.run_id if winner else None, front=front,
                                           statuses={b.run_id: b.status for b in built}))
    chosen = set(to_publish(mode=spec.publish_mode, winner=winner_label,
                            passing=[b.member.label for b in built if b.status == "passed"]))

    outcomes, first_error = [], None
    for b in built:
        if b.status != "passed":
            outcomes.append(SweepMemberOutcome(label=b.member.label, run_id=b.run_id, status=b.status, error=b.error))
            continue
        recorder = open_runs[b.run_id]
        uri = None
        if b.member.label in chosen:
            assert b.quant is not None and b.bench is not None and b.decision is not None
            try:
                started = time.perf_counter()
                publication = publish_task(b.spec, merged, b.quant, b.bench, b.decision,
                                           b.runnability.results if b.runnability else (), matrix_markdown=matrix)
                recorder.publication(publication, time.perf_counter() - started)
                uri = publication.uri
            except Exception as exc:  # noqa: BLE001 - this member failed; the others still publish
                recorder.fail(exc)
                del open_runs[b.run_id]
                first_error = first_error or exc
                outcomes.append(SweepMemberOutcome(label=b.member.label, run_id=b.run_id, status="failed",
                                                   error=str(exc) or repr(exc)))
                continue
        recorder.finish("passed")
        del open_runs[b.run_id]
        outcomes.append(SweepMemberOutcome(label=b.member.label, run_id=b.run_id, status="passed",
                                           published=uri is not None, artifact_uri=uri))
    if first_error is not None:
        raise first_error

    catalog.finish_sweep(sweep_id=sweep_id, winner_run_id=winner.run_id if winner else None, front=front)
    _matrix_artifact(catalog, sweep_id)
    progress(f"sweep {sweep_id}: " + (f"winner {winner_label} ({spec.objective})" if winner else "no configuration passed")
             + f"; front {', '.join(front_labels) or '-'}")
    return SweepOutcome(sweep_id=sweep_id, status="finished", objective=spec.objective,
                        publish_mode=spec.publish_mode, winner_label=winner_label,
                        winner_run_id=winner.run_id if winner else None, front=tuple(front_labels),
                        members=tuple(outcomes), baseline_path=baseline.path, baseline_reused=baseline.reused)


def _baseline(model: ModelArtifact, spec: SweepSpec, *, sweep_id: str, deployment: str | None) -> BaselineResult:
    """The fp16 side of *model*, once for every member: here, or a baseline-only GPU stage on the pool."""
    if not deployment:
        return benchmark_baseline_task(model, spec.benchmark)
    settings = get_settings()
    stage = dispatch_gpu_stage(deployment=deployment, model=model, quantize=None, benchmark=spec.benchmark,
                               run_id=sweep_id, timeout_s=settings.gpu_timeout_s, poll_s=settings.gpu_poll_s)
    if stage.state_type != "COMPLETED" or stage.outcome is None or stage.outcome.baseline is None:
        raise stage.error()
    return stage.outcome.baseline


@task(name="sweep-member", cache_policy=NO_CACHE)
def member_task(*, spec: FactorySpec, member: SweepMember, position: int, sweep_id: str, base: ModelArtifact,
                adapters: tuple[AdapterArtifact, ...], merged: MergeResult, baseline: BaselineResult,
                deployment: str | None, slots: contextlib.AbstractContextManager) -> _Built:
    """One configuration as a plain run up to its gate; a failure is recorded and returned, not raised."""
    run_id = str(uuid.uuid4())
    run_key = step_key("run", spec=spec)
    recorder = RunRecorder.start(run_id=run_id, name=spec.name, spec=spec.model_dump(mode="json"), run_key=run_key,
                                 flow_run_id=runtime.flow_run.id)
    try:
        recorder.catalog.add_member(sweep_id=sweep_id, run_id=run_id, label=member.label, kernel=member.kernel,
                                    position=position)
        with claims.holding(recorder.catalog, run_key, holder=claims.holder_name(run_id), on_wait=progress):
            # The shared steps, recorded on every member as a plain run records them.
            recorder.step("download", base, detail={"sha": base.sha, "kind": base.kind})
            recorder.sources(base, adapters)
            recorder.merge(merged)
            gate = spec.gate_in_effect()
            if deployment:
                quant, bench, runnable = _gpu_stage_on_pool(
                    recorder, deployment=deployment, model=merged.model, quantize=spec.quantize,
                    benchmark=spec.benchmark, run_id=run_id, baseline=baseline, gate=gate)
                early = decide_before_benchmark(spec=gate, runnability=runnable)
            else:
                with slots:
                    quant = quantize_task(merged.model, spec.quantize, spec.benchmark.device)
                    recorder.quantize(quant)
                    runnable = runnability_task(quant, spec.benchmark)
                    recorder.runnability(runnable, artifact=quant.model.path)
                    bench = None  # a failed runnability check rejects the member before its benchmark
                    if (early := decide_before_benchmark(spec=gate, runnability=runnable)) is None:
                        bench = benchmark_candidate_task(baseline, quant.model, spec.benchmark)
                        recorder.benchmark(bench)
            started = time.perf_counter()
            decision = early or gate_task(bench, gate, runnable)
            recorder.gate(decision, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - recorded on the member's run; the other members go on
        progress(f"sweep {sweep_id}: member {member.label} failed: {exc}")
        recorder.fail(exc)
        return _Built(member=member, spec=spec, run_id=run_id, status="failed", error=str(exc) or repr(exc))
    if not decision.passed:
        recorder.finish("rejected")
    return _Built(member=member, spec=spec, run_id=run_id, status="passed" if decision.passed else "rejected",
                  quant=quant, bench=bench, decision=decision, runnability=runnable)


def _matrix_artifact(catalog: Catalog, sweep_id: str) -> None:
    """Leave the sweep's matrix as a Prefect markdown artifact (key ``sweep-<id8>``); best effort."""
    from prefect.artifacts import create_markdown_artifact

    try:
        detail = catalog.get_sweep(sweep_id)
        create_markdown_artifact(key=artifact_key(sweep_id), markdown=sweep_matrix_markdown(detail),
                                 description=f"modelfactory sweep {sweep_id}: {detail.status}")
    except Exception as exc:  # noqa: BLE001 - the catalog rows are the record; the artifact is a view
        get_logger().warning(f"could not create the Prefect artifact of sweep {sweep_id}: {exc}")


def artifact_key(sweep_id: str) -> str:
    """The Prefect artifact key of a sweep's matrix: ``sweep-`` + the first 8 characters of its id."""
    import re

    return "sweep-" + re.sub(r"[^a-z0-9-]", "-", sweep_id[:8].lower())
