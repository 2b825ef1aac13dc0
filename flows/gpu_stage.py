"""The GPU stage: quantize + benchmark as one flow, deployed to the ``gpu`` work pool.

The factory flow calls it through ``run_deployment`` when ``MODELFACTORY_GPU_DEPLOYMENT`` is set
(see :mod:`modelfactory.gpu_pool` and ``docs/gpu-pool.md``). One flow run holds one GPU: each GPU
worker serves one flow run at a time and sees only its own device (``CUDA_VISIBLE_DEVICES``).
Wiring only; the steps are the same tasks the in-process factory runs.
"""

from __future__ import annotations

from prefect import flow, runtime

from modelfactory.gpu_pool import GpuStageOutcome, run_gpu_steps
from modelfactory.records import ModelArtifact
from modelfactory.specs import BenchmarkSpec, QuantSpec


@flow(name="gpu-stage", log_prints=True, validate_parameters=True)
def gpu_stage(model: ModelArtifact, quantize: QuantSpec, benchmark: BenchmarkSpec) -> GpuStageOutcome:
    """GPTQ-quantize *model* and benchmark it against itself in fp16, on this worker's GPU."""
    return run_gpu_steps(model, quantize, benchmark, flow_run_id=runtime.flow_run.id)
