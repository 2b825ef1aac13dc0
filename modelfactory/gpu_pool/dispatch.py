"""The factory side of the GPU stage: run the ``gpu-stage`` deployment, wait, read its outcome."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from modelfactory.core.errors import ERRORS_BY_NAME, GpuStageError, ModelFactoryError
from modelfactory.core.log import get_logger
from modelfactory.core.records import BaselineResult, ModelArtifact, Record
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import BenchmarkSpec, GateSpec, QuantSpec
from modelfactory.gpu_pool.outcome import (
    GPU_POOL,
    GpuStageOutcome,
    outcome_location,
    read_outcome,
)


class GpuStageRun(Record):
    """The factory's view of one GPU stage flow run, once it ended (or the wait did)."""

    deployment: str
    flow_run_id: str
    flow_run_name: str
    state_type: str  # COMPLETED, FAILED, CRASHED, CANCELLED, ... (or SCHEDULED/RUNNING on timeout)
    state_name: str
    state_message: str | None
    queued_s: float | None
    run_s: float | None
    outcome: GpuStageOutcome | None

    def detail(self) -> dict[str, Any]:
        """The catalog's ``gpu-stage`` step detail."""
        placement = self.outcome.placement if self.outcome else None
        return {
            "deployment": self.deployment,
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "state": self.state_type,
            "message": self.state_message,
            "queued_s": self.queued_s,
            "hostname": placement.hostname if placement else None,
            "cuda_visible_devices": placement.cuda_visible_devices if placement else None,
            "device": placement.device if placement else None,
        }

    def error(self) -> ModelFactoryError:
        """The error this run ended with, as the factory raises it."""
        where = f"GPU stage flow run {self.flow_run_name!r} ({self.flow_run_id}) of deployment {self.deployment}"
        if self.outcome is not None and self.outcome.error_type:
            cls = ERRORS_BY_NAME.get(self.outcome.error_type)
            if cls is not None:
                return cls(self.outcome.error_message or "")
            return GpuStageError(f"{where} failed: {self.outcome.error_type}: {self.outcome.error_message}")
        if self.state_type == "CRASHED":
            return GpuStageError(
                f"{where} crashed ({self.state_name}: {self.state_message or 'no message'}): its worker or host "
                "died mid-run, so nothing it was building is kept. Check the GPU worker (infra/gpu-host), then "
                "run the factory again: finished steps are reused")
        if self.state_type in ("CANCELLED", "CANCELLING"):
            return GpuStageError(f"{where} was cancelled ({self.state_message or 'no message'})")
        if self.state_type == "COMPLETED":
            return GpuStageError(
                f"{where} completed but left no outcome at {outcome_location(self.flow_run_id)}: the GPU worker "
                "and the factory must use the same MODELFACTORY_STAGE_STORE_URL (or, without a stage store, share "
                "MODELFACTORY_WORK_DIR: same host, or the same mounted volume)")
        if self.state_type in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "LATE"):
            return GpuStageError(
                f"{where} did not finish within MODELFACTORY_GPU_TIMEOUT_S={get_settings().gpu_timeout_s} s "
                f"(still {self.state_name}; cancelled): are GPU workers running on pool {GPU_POOL!r}? "
                "(infra/gpu-host/start-workers.sh)")
        return GpuStageError(f"{where} ended {self.state_name}: {self.state_message or 'no message'}")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def stage_key(run_id: str) -> str:
    """The idempotency key of a run's GPU stage: one per attempt of the calling flow run, so a second
    dispatch of one attempt gets the same stage back, while a retry of the run (the on-finetune flow
    retried: the same run id) starts a fresh stage instead of getting the old, crashed one."""
    from prefect import runtime

    return f"{run_id}:gpu-stage:{runtime.flow_run.id or 'local'}:{runtime.flow_run.run_count or 1}"


def dispatch_gpu_stage(*, deployment: str, model: ModelArtifact, quantize: QuantSpec | None, benchmark: BenchmarkSpec,
                       run_id: str, baseline: BaselineResult | None = None, timeout_s: float | None = None,
                       poll_s: float | None = None, gate: GateSpec | None = None) -> GpuStageRun:
    """Run the GPU stage as a flow run of *deployment* and wait for it (a subflow of the caller).

    The stage's modes (``flows/gpu_stage.py``): quantize + benchmark (the plain factory); with
    *baseline*, quantize + the GPTQ side against that shared fp16 measurement (a sweep member);
    with *quantize* ``None``, the fp16 side only (a sweep's baseline). *run_id* names the run (or
    sweep) the stage belongs to: its tag and, with the calling flow run's attempt, its idempotency key
    (:func:`stage_key`). *gate*: the gate in effect, so that the stage
    stops after a failed runnability check it requires, before the benchmark.
    Returns when the run is final or *timeout_s* passed (then the run is cancelled); *timeout_s* and *poll_s*
    default to ``MODELFACTORY_GPU_TIMEOUT_S`` / ``MODELFACTORY_GPU_POLL_S``.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled, Cancelling

    settings = get_settings()
    timeout_s = timeout_s if timeout_s is not None else settings.gpu_timeout_s
    poll_s = poll_s if poll_s is not None else settings.gpu_poll_s
    logger = get_logger()
    parameters = {"model": model.model_dump(mode="json"),
                  "quantize": quantize.model_dump(mode="json") if quantize is not None else None,
                  "benchmark": benchmark.model_dump(mode="json")}
    if baseline is not None:  # only then: a gpu-stage deployment of an older checkout keeps working
        parameters["baseline"] = baseline.model_dump(mode="json")
    if gate is not None:
        parameters["gate"] = gate.model_dump(mode="json")
    what = ("the fp16 baseline" if quantize is None
            else "quantize + benchmark against the shared fp16 baseline" if baseline is not None
            else "quantize + benchmark")
    logger.info(f"gpu-stage: dispatching {what} to deployment {deployment!r}")
    started = time.perf_counter()
    try:
        flow_run = run_deployment(deployment, parameters=parameters, timeout=timeout_s, poll_interval=poll_s,
                                  idempotency_key=stage_key(run_id), tags=["modelfactory", f"run:{run_id}"])
    except ObjectNotFound as exc:
        raise GpuStageError(
            f"deployment {deployment!r} (MODELFACTORY_GPU_DEPLOYMENT) does not exist on the Prefect server "
            f"{PREFECT_API_URL.value() or '(ephemeral)'}: run `python -m modelfactory.interfaces.deploy` there, or unset "
            "MODELFACTORY_GPU_DEPLOYMENT to run the GPU steps in this process") from exc
    state = flow_run.state
    if state is None or not state.is_final():
        with get_client(sync_client=True) as client:
            running = state is not None and state.is_running()
            client.set_flow_run_state(flow_run.id, Cancelling() if running else Cancelled(
                message="the factory stopped waiting (MODELFACTORY_GPU_TIMEOUT_S)"), force=True)
    outcome = read_outcome(str(flow_run.id))
    result = GpuStageRun(
        deployment=deployment, flow_run_id=str(flow_run.id), flow_run_name=flow_run.name,
        state_type=state.type.value if state else "UNKNOWN", state_name=state.name if state else "unknown",
        state_message=state.message if state else None,
        queued_s=_seconds(flow_run.expected_start_time, flow_run.start_time),
        run_s=flow_run.total_run_time.total_seconds() if flow_run.total_run_time else None, outcome=outcome)
    logger.info(f"gpu-stage: flow run {flow_run.name} ended {result.state_name} after "
                f"{time.perf_counter() - started:.0f} s (queued {result.queued_s or 0:.0f} s)"
                + (f" on {outcome.placement.hostname}, CUDA_VISIBLE_DEVICES={outcome.placement.cuda_visible_devices}"
                   if outcome else ""))
    return result
