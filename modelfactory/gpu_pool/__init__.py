"""The GPU worker pool: where a GPU stage ran (outcome) and how the factory dispatches it (dispatch).

The ``gpu-stage`` flow itself (quantize + benchmark on one GPU) is wiring in ``flows/gpu_stage.py``.
"""

from modelfactory.gpu_pool.dispatch import GpuStageRun, dispatch_gpu_stage
from modelfactory.gpu_pool.outcome import (
    DEFAULT_GPU_DEPLOYMENT,
    GPU_POOL,
    GpuPlacement,
    GpuStageOutcome,
    current_placement,
    outcome_location,
    read_outcome,
    write_outcome,
)

__all__ = ["DEFAULT_GPU_DEPLOYMENT", "GPU_POOL", "GpuPlacement", "GpuStageOutcome", "GpuStageRun", "current_placement",
           "dispatch_gpu_stage", "outcome_location", "read_outcome", "write_outcome"]
