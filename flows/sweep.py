"""The sweep flow: one merged model, N quantization configurations, one winner. Wiring only: the
decisions are :mod:`modelfactory.sweeps`'s.

1. download + merge **once**; the sweep is recorded (``start_sweep``, ``set_sweep_base``);
2. the fp16 side measured **once** (``benchmark_baseline``): in this process, or as a baseline-only
   ``gpu-stage`` run on the pool when ``MODELFACTORY_GPU_DEPLOYMENT`` is set (a member that lands on
   another card class measures the fp16 side again there: ``flows/gpu_stage.py``);
3. every member **concurrently**, each its own catalog run of ``spec.member_spec(member)`` (linked
   with ``add_member`` as it starts), holding its run-key claim as a plain run does: quantize + the
   GPTQ side against the shared baseline + gate — one ``gpu-stage`` run per member on the pool (its
   slots bound the concurrency), else Prefect task concurrency in this process
   (:func:`~modelfactory.sweeps.outcome.local_member_slots`). A member whose step fails is recorded
   failed; the others go on. A member that passed waits, its run open and its claim held
   (:class:`~modelfactory.sweeps.coordination.MemberRendezvous`);
4. once every member is gated, the sweep decides (:func:`~modelfactory.sweeps.coordination.decide_sweep`:
   the Pareto front and the objective's winner among the passing members, and which to publish: the
   winner, every passing member, each on its own branch, or none); each chosen member publishes
   inside its claim with the sweep's matrix in its model card and closes its run; ``finish_sweep``;
   the matrix as a Prefect markdown artifact (``sweep-<id8>``). Any other error fails the sweep
   (``fail_sweep``), and the members still waiting fail their runs with it.

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

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from modelfactory import stage_store
from modelfactory.catalog import Catalog, claims, open_catalog
from modelfactory.core.devices import resolve_device
from modelfactory.core.errors import error_kind
from modelfactory.core.hashing import step_key
from modelfactory.core.log import get_logger, progress
from modelfactory.core.records import AdapterArtifact, BaselineResult, MergeResult, ModelArtifact
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import FactorySpec
from modelfactory.core.sweep_spec import MAX_MEMBERS, SweepMember, SweepSpec
from modelfactory.gpu_pool import dispatch_gpu_stage
from modelfactory.reports import sweep_matrix_markdown
from modelfactory.sweeps.coordination import MemberRendezvous, decide_sweep
from modelfactory.sweeps.outcome import SweepOutcome, local_member_slots
from modelfactory.tasks.benchmark import benchmark_baseline_task, benchmark_candidate_task
from modelfactory.tasks.download import download_task, resolve_adapter_task
from modelfactory.tasks.gate import decide_before_benchmark, gate_task
from modelfactory.tasks.merge import merge_task
from modelfactory.tasks.publish import publish_task
from modelfactory.tasks.quantize import quantize_task, resolve_group_size
from modelfactory.tasks.record import RunRecorder, record_crash
from modelfactory.tasks.runnability import runnability_task


@flow(name="sweep", log_prints=True, validate_parameters=True, on_crashed=[record_crash],
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_MEMBERS))
def sweep(spec: SweepSpec, sweep_id: str | None = None) -> SweepOutcome:
    """Quantize one (fine-tuned) model in several GPTQ configurations, keep the best, publish it."""
    sweep_id = sweep_id or str(uuid.uuid4())
    catalog = open_catalog()
    catalog.start_sweep(sweep_id=sweep_id, name=spec.name, spec=spec.model_dump(mode="json"),
                        objective=spec.objective, publish_mode=spec.publish_mode, flow_run_id=runtime.flow_run.id)
    # Alive while this process is (modelfactory catalog reconcile closes the sweep once it is not).
    end_lease = claims.keep_alive(catalog, claims.alive_key("sweep", sweep_id), holder=claims.holder_name(sweep_id))
    try:
        return _sweep(spec, sweep_id, catalog)
    except BaseException as exc:
        try:
            catalog.fail_sweep(sweep_id=sweep_id, error=str(exc) or repr(exc), error_kind=error_kind(exc))
        except Exception as record_exc:  # noqa: BLE001 - report, keep the original error
            get_logger().error(f"could not record the failure of sweep {sweep_id}: {record_exc}")
        _matrix_artifact(catalog, sweep_id)
        raise
    finally:
        end_lease()


def _sweep(spec: SweepSpec, sweep_id: str, catalog: Catalog) -> SweepOutcome:
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

    # Local steps share this host: a semaphore bounds them (on a GPU: as many as its memory takes, from the fp16
    # side's measured memory). On the pool its workers' slots do.
    if deployment:
        slots = contextlib.nullcontext()
    else:
        device = resolve_device(spec.benchmark.device)
        count = local_member_slots(device, baseline=baseline)
        progress(f"sweep {sweep_id}: {count} member(s) at once on this host's {device}")
        slots = threading.BoundedSemaphore(count)
    rendezvous = MemberRendezvous(len(members))
    futures = [member_task.with_options(task_run_name=f"member-{member.label}").submit(
        spec=spec.member_spec(member), member=member, position=position, sweep_id=sweep_id, base=base,
        adapters=adapters, merged=merged, baseline=baseline, deployment=deployment, slots=slots,
        rendezvous=rendezvous) for position, member in enumerate(members)]
    try:
        passing = rendezvous.wait_for_members()
        decision = decide_sweep(catalog.get_sweep(sweep_id), passing=passing, objective=spec.objective,
                                publish_mode=spec.publish_mode)
    except BaseException as exc:
        rendezvous.abort(exc)  # the members waiting fail their runs with this error
        for future in futures:
            future.wait()
        raise
    rendezvous.decide(decision)
    for future in futures:
        future.result()  # every member closed its run (a member whose task raised: raised here)
    if (error := rendezvous.publish_error(decision)) is not None:
        raise error  # a chosen member could not publish: the sweep fails (its run says why)

    catalog.finish_sweep(sweep_id=sweep_id, winner_run_id=decision.winner_run_id, front=list(decision.front))
    _matrix_artifact(catalog, sweep_id)
    progress(f"sweep {sweep_id}: " + (f"winner {decision.winner_label} ({spec.objective})" if decision.winner_label
                                      else "no configuration passed")
             + f"; front {', '.join(decision.front_labels) or '-'}")
    return SweepOutcome(sweep_id=sweep_id, status="finished", objective=spec.objective,
                        publish_mode=spec.publish_mode, winner_label=decision.winner_label,
                        winner_run_id=decision.winner_run_id, front=decision.front_labels,
                        members=catalog.get_sweep(sweep_id).members, baseline_path=baseline.path,
                        baseline_reused=baseline.reused)


def _baseline(model: ModelArtifact, spec: SweepSpec, *, sweep_id: str, deployment: str | None) -> BaselineResult:
    """The fp16 side of *model*, once for every member: here, or a baseline-only GPU stage on the pool."""
    if not deployment:
        return benchmark_baseline_task(model, spec.benchmark)
    stage = dispatch_gpu_stage(deployment=deployment, model=model, quantize=None, benchmark=spec.benchmark,
                               run_id=sweep_id)
    if stage.state_type != "COMPLETED" or stage.outcome is None or stage.outcome.baseline is None:
        raise stage.error()
    return stage.outcome.baseline


@task(name="sweep-member", cache_policy=NO_CACHE)
def member_task(*, spec: FactorySpec, member: SweepMember, position: int, sweep_id: str, base: ModelArtifact,
                adapters: tuple[AdapterArtifact, ...], merged: MergeResult, baseline: BaselineResult,
                deployment: str | None, slots: contextlib.AbstractContextManager,
                rendezvous: MemberRendezvous) -> str:
    """One configuration as a plain run, from its start to its end (its status); a failure is recorded."""
    try:
        return _member(spec=spec, member=member, position=position, sweep_id=sweep_id, base=base, adapters=adapters,
                       merged=merged, baseline=baseline, deployment=deployment, slots=slots, rendezvous=rendezvous)
    finally:
        rendezvous.ended(position)  # whatever happened, the sweep does not wait for this member any longer


def _member(*, spec: FactorySpec, member: SweepMember, position: int, sweep_id: str, base: ModelArtifact,
            adapters: tuple[AdapterArtifact, ...], merged: MergeResult, baseline: BaselineResult,
            deployment: str | None, slots: contextlib.AbstractContextManager,
            rendezvous: MemberRendezvous) -> str:
    run_id = str(uuid.uuid4())
    run_key = step_key("run", spec=spec)
    recorder = RunRecorder.start(run_id=run_id, name=spec.name, spec=spec.model_dump(mode="json"), run_key=run_key,
                                 flow_run_id=runtime.flow_run.id)
    try:
        recorder.catalog.add_member(sweep_id=sweep_id, run_id=run_id, label=member.label, kernel=member.kernel,
                                    position=position)
        with claims.holding(recorder.catalog, run_key, holder=claims.holder_name(run_id), on_wait=progress) as held:
            recorder.hold(held)  # a lost claim stops this member at its next record
            # The shared steps, recorded on every member as a plain run records them.
            recorder.step("download", base, detail={"sha": base.sha, "kind": base.kind})
            recorder.sources(base, adapters)
            recorder.merge(merged)
            gate = spec.gate_in_effect()
            if deployment:
                stage = dispatch_gpu_stage(deployment=deployment, model=merged.model, quantize=spec.quantize,
                                           benchmark=spec.benchmark, run_id=run_id, baseline=baseline, gate=gate)
                quant, bench, runnable = recorder.gpu_stage(stage, gate=gate)
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
            if not decision.passed:
                recorder.finish("rejected")
                return "rejected"
            # Passed: wait for the sweep's decision, the run open and its claim held (a plain run publishes
            # inside its claim too); a chosen member publishes now.
            chosen = rendezvous.passed(position, run_id)
            if run_id in chosen.publish:
                recorder.check_claim()
                started = time.perf_counter()
                publication = publish_task(spec, merged, quant, bench, decision,
                                           runnable.results if runnable else (), matrix_markdown=chosen.matrix_markdown)
                recorder.publication(publication, time.perf_counter() - started)
            recorder.finish("passed")
            return "passed"
    except Exception as exc:  # noqa: BLE001 - recorded on the member's run; the other members go on
        progress(f"sweep {sweep_id}: member {member.label} failed: {exc}")
        recorder.fail(exc)
        rendezvous.failed(run_id, exc)
        return "failed"
    except BaseException as exc:
        recorder.fail(exc)
        raise


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
