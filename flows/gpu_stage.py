"""The GPU stage: quantize + benchmark as one flow, deployed to the ``gpu`` work pool.

The factory flow dispatches it through ``run_deployment`` when ``MODELFACTORY_GPU_DEPLOYMENT`` is
set (:mod:`modelfactory.gpu_pool`, ``docs/gpu-pool.md``). One flow run holds one GPU: each GPU
worker serves one flow run at a time and sees only its own device (``CUDA_VISIBLE_DEVICES``).
Wiring only; the steps are the same tasks the in-process factory runs.

Three modes, by the parameters: quantize + benchmark (the plain factory); quantize + the GPTQ side
against a given *baseline* (a sweep member: the fp16 side was measured once for the sweep); and,
with no *quantize*, the fp16 side alone (that one baseline measurement of a sweep, ``flows/sweep.py``).
"""

from __future__ import annotations

import uuid

from prefect import flow, runtime

from modelfactory.core.errors import ModelFactoryError
from modelfactory.core.log import get_logger
from modelfactory.core.records import BaselineResult, ModelArtifact
from modelfactory.core.specs import BenchmarkSpec, GateSpec, QuantSpec
from modelfactory.gpu_pool import GpuStageOutcome, current_placement, write_outcome
from modelfactory.gpu_pool.outcome import now_iso
from modelfactory.tasks.benchmark import (
    baseline_key,
    benchmark_baseline_task,
    benchmark_candidate_task,
    benchmark_task,
)
from modelfactory.tasks.gate import decide_before_benchmark
from modelfactory.tasks.quantize import quantize_task
from modelfactory.tasks.runnability import runnability_task


@flow(name="gpu-stage", log_prints=True, validate_parameters=True)
def gpu_stage(model: ModelArtifact, quantize: QuantSpec | None, benchmark: BenchmarkSpec,
              baseline: BaselineResult | None = None, gate: GateSpec | None = None) -> GpuStageOutcome:
    """GPTQ-quantize *model* and benchmark it against itself in fp16, on this worker's GPU.

    With *baseline* (its fp16 side, measured once for a sweep) only the GPTQ side is measured, unless
    this worker's card is of another class than the one that measured it (a mixed H100/H200 pool):
    then the fp16 side is measured here, once per card class (its key names the GPU);
    with *quantize* ``None`` only the fp16 side of *model* is (the sweep's baseline). With *gate*, a
    runnability check it requires that fails ends the stage before the benchmark (no benchmark record).

    The outcome (records, where it ran, or the error) is written for the factory either way. With a
    stage store its records carry ``s3://`` URIs: the inputs are fetched here, the outputs uploaded.
    """
    flow_run_id = runtime.flow_run.id
    placement = current_placement(flow_run_id)
    outcome_id = flow_run_id or f"local-{uuid.uuid4()}"
    get_logger().info(f"gpu-stage: on {placement.hostname} (pid {placement.pid}), "
                      f"CUDA_VISIBLE_DEVICES={placement.cuda_visible_devices}, device {placement.device}")
    quant = bench = fp16 = runnable = None
    try:
        if quantize is None:
            fp16 = benchmark_baseline_task(model, benchmark)
        else:
            quant = quantize_task(model, quantize, benchmark.device)
            runnable = runnability_task(quant, benchmark)  # here, so CUDA is covered on a GPU worker
            if gate is None or decide_before_benchmark(spec=gate, runnability=runnable) is None:
                if baseline is not None and baseline.key != baseline_key(model_sha=baseline.model_sha, spec=benchmark):
                    # Mixed card classes in one pool: the fp16 side is measured once per card class (keyed by the
                    # host's GPU), here, and reused by every member that lands on this class.
                    get_logger().info(f"gpu-stage: the shared fp16 side ({baseline.path}) was measured on another "
                                      f"kind of host than this {placement.device}: measuring it here, once for "
                                      "this card class")
                    baseline = benchmark_baseline_task(model, benchmark)
                bench = (benchmark_candidate_task(baseline, quant.model, benchmark) if baseline is not None
                         else benchmark_task(model, quant.model, benchmark))
    except BaseException as exc:
        message = exc.message if isinstance(exc, ModelFactoryError) else (str(exc) or repr(exc))
        write_outcome(outcome_id, GpuStageOutcome(
            placement=placement.model_copy(update={"finished_at": now_iso()}), quantize=quant, runnability=runnable,
            error_type=type(exc).__name__, error_message=message[:4000]))
        raise
    outcome = GpuStageOutcome(placement=placement.model_copy(update={"finished_at": now_iso()}),
                              quantize=quant, benchmark=bench, baseline=fp16, runnability=runnable)
    write_outcome(outcome_id, outcome)
    return outcome
