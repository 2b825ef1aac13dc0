"""The factory flow: download → merge → quantize → runnability → benchmark → gate → publish, all recorded.

Only wiring lives here; each step is a pure function with a thin task in ``tasks/``. With
``MODELFACTORY_GPU_DEPLOYMENT`` set, quantize + benchmark run as the ``gpu-stage`` flow on the
``gpu`` work pool (``flows/gpu_stage.py``, ``docs/gpu-pool.md``); otherwise in this process.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow, runtime

from modelfactory.catalog import claims
from modelfactory.core.hashing import step_key
from modelfactory.core.log import progress
from modelfactory.core.records import RunOutcome
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import FactorySpec
from modelfactory.gpu_pool import dispatch_gpu_stage
from modelfactory.tasks.benchmark import benchmark_task, check_tasks_task
from modelfactory.tasks.download import download_task, resolve_adapter_task
from modelfactory.tasks.gate import decide_before_benchmark, gate_task
from modelfactory.tasks.merge import merge_task
from modelfactory.tasks.publish import publish_task
from modelfactory.tasks.quantize import quantize_task
from modelfactory.tasks.record import RunRecorder, record_crash
from modelfactory.tasks.runnability import runnability_task


@flow(name="model-factory", log_prints=True, validate_parameters=True, on_crashed=[record_crash])
def factory(spec: FactorySpec, run_id: str | None = None) -> RunOutcome:
    """Quantize a (fine-tuned) model with GPTQ, verify it against fp16, publish it if it passes."""
    run_id = run_id or str(uuid.uuid4())
    run_key = step_key("run", spec=spec)
    recorder = RunRecorder.start(run_id=run_id, name=spec.name, spec=spec.model_dump(mode="json"),
                                 run_key=run_key, flow_run_id=runtime.flow_run.id)
    try:
        # An identical run in progress (same spec, on any host) finishes first; this one then reuses
        # its outputs. A claim row in the catalog, not a file lock: hosts may share no disk.
        with claims.holding(recorder.catalog, run_key, holder=claims.holder_name(run_id), on_wait=progress) as held:
            recorder.hold(held)  # a lost claim stops this run at its next record (docs/reliability.md)
            return _steps(spec, run_id, recorder)
    except BaseException as exc:
        recorder.fail(exc)
        raise


def _steps(spec: FactorySpec, run_id: str, recorder: RunRecorder) -> RunOutcome:
    """download → merge → quantize → benchmark → gate → publish, each recorded as it ends."""
    check_tasks_task(spec.benchmark.tasks)  # an unknown task or missing data fails before any download
    base = download_task(spec.base, spec.trust_remote_code)
    recorder.step("download", base, detail={"sha": base.sha, "kind": base.kind})
    adapters = tuple(resolve_adapter_task(adapter) for adapter in spec.adapters)
    recorder.sources(base, adapters)

    merged = merge_task(base, adapters, spec.merge)
    recorder.merge(merged)

    gate = spec.gate_in_effect()
    progress(f"gate: checks in effect: {gate.describe()}")
    if gpu_deployment := get_settings().gpu_deployment:  # GPU steps on the gpu work pool
        stage = dispatch_gpu_stage(deployment=gpu_deployment, model=merged.model, quantize=spec.quantize,
                                   benchmark=spec.benchmark, run_id=run_id, gate=gate)
        quant, bench, runnable = recorder.gpu_stage(stage, gate=gate)
        early = decide_before_benchmark(spec=gate, runnability=runnable)
    else:  # in this process
        quant = quantize_task(merged.model, spec.quantize, spec.benchmark.device)
        recorder.quantize(quant)
        runnable = runnability_task(quant, spec.benchmark)
        recorder.runnability(runnable, artifact=quant.model.path)

        # A failed runnability check rejects the run here, before the benchmark spends anything.
        bench = None
        if (early := decide_before_benchmark(spec=gate, runnability=runnable)) is None:
            bench = benchmark_task(merged.model, quant.model, spec.benchmark)
            recorder.benchmark(bench)

    started = time.perf_counter()
    decision = early or gate_task(bench, gate, runnable)
    recorder.gate(decision, time.perf_counter() - started)

    publication = None
    if decision.passed:
        recorder.check_claim()  # never publish once another run took the key
        started = time.perf_counter()
        publication = publish_task(spec, merged, quant, bench, decision, runnable.results if runnable else ())
        recorder.publication(publication, time.perf_counter() - started)
    status = "passed" if decision.passed else "rejected"
    recorder.finish(status)
    return RunOutcome(run_id=run_id, status=status, artifact_uri=publication.uri if publication else None,
                      gate=decision.summary(), ratios=bench.ratios() if bench else {})
