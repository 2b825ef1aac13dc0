"""The GPU stage (quantize + benchmark) as its own Prefect flow run on the ``gpu`` work pool.

Why a separate flow run: the factory's light steps (download, merge, gate, publish, record)
run anywhere, while quantize and benchmark need a GPU. The factory hands the merged model to
the ``gpu-stage`` deployment with :func:`prefect.deployments.run_deployment`; Prefect's work
pool queues the run until a GPU worker has a free slot (one worker per GPU, ``--limit 1``,
``CUDA_VISIBLE_DEVICES`` set per worker: see ``infra/gpu-host/start-workers.sh``).

How the result comes back: the sub-flow writes a small JSON record (:class:`GpuStageOutcome`:
the quantize and benchmark records, where it ran, or the error) to
``$MODELFACTORY_WORK_DIR/gpu-stage/runs/<flow_run_id>.json``, atomically, on success *and* on
failure; the factory reads it after the flow run reaches a final state. The records hold paths
into the work dir, so the work dir must be shared by both sides anyway (one host today; across
hosts the artifact store takes that role). Prefect's own result persistence is not needed.

Crashes: a flow run whose worker or host dies stops sending heartbeats; the ``modelfactory:
crash zombie flow runs`` automation (installed by :mod:`modelfactory.deploy`) marks it
``Crashed``, which ends the factory's wait; the factory then fails with
:class:`~modelfactory.errors.GpuStageError` and the catalog shows the run ``failed``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfactory.errors import ERRORS_BY_NAME, GpuStageError, ModelFactoryError
from modelfactory.log import get_logger
from modelfactory.records import BenchmarkResult, ModelArtifact, QuantResult, Record
from modelfactory.settings import get_settings
from modelfactory.specs import BenchmarkSpec, QuantSpec

if TYPE_CHECKING:
    from tasks.record import RunRecorder

#: ``flow name/deployment name`` of the GPU stage, as declared in ``deployments/prefect.yaml``.
DEFAULT_GPU_DEPLOYMENT = "gpu-stage/gpu"
GPU_POOL = "gpu"


class GpuPlacement(Record):
    """Where a GPU stage ran: the slot it held (``CUDA_VISIBLE_DEVICES``) and the process."""

    flow_run_id: str | None
    hostname: str
    pid: int
    cuda_visible_devices: str | None
    device: str  # "cpu" or the CUDA device name torch sees
    started_at: str
    finished_at: str | None = None


class GpuStageOutcome(Record):
    """What the ``gpu-stage`` flow hands back (as JSON in the work dir)."""

    placement: GpuPlacement
    quantize: QuantResult | None = None
    benchmark: BenchmarkResult | None = None
    error_type: str | None = None
    error_message: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def current_placement(flow_run_id: str | None) -> GpuPlacement:
    """The slot and process this GPU stage runs in (torch is asked only if already importable)."""
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - placement is informational
        pass
    return GpuPlacement(flow_run_id=flow_run_id, hostname=socket.gethostname(), pid=os.getpid(),
                        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), device=device,
                        started_at=_now())


def outcome_path(flow_run_id: str) -> Path:
    return get_settings().resolved_work_dir / "gpu-stage" / "runs" / f"{flow_run_id}.json"


def write_outcome(path: Path, outcome: GpuStageOutcome) -> None:
    """Write *outcome* atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(outcome.model_dump_json(indent=2))
    os.replace(tmp, path)


def read_outcome(flow_run_id: str) -> GpuStageOutcome | None:
    path = outcome_path(flow_run_id)
    if not path.is_file():
        return None
    return GpuStageOutcome.model_validate_json(path.read_text())


def run_gpu_steps(model: ModelArtifact, quantize: QuantSpec, benchmark: BenchmarkSpec,
                  *, flow_run_id: str | None) -> GpuStageOutcome:
    """Body of the ``gpu-stage`` flow: quantize then benchmark, the outcome written either way."""
    from tasks.benchmark import benchmark_task
    from tasks.quantize import quantize_task

    placement = current_placement(flow_run_id)
    path = outcome_path(flow_run_id or f"local-{uuid.uuid4()}")
    get_logger().info(f"gpu-stage: on {placement.hostname} (pid {placement.pid}), "
                      f"CUDA_VISIBLE_DEVICES={placement.cuda_visible_devices}, device {placement.device}")
    quant = bench = None
    try:
        quant = quantize_task(model, quantize, benchmark.device)
        bench = benchmark_task(model, quant.model, benchmark)
    except BaseException as exc:
        message = exc.message if isinstance(exc, ModelFactoryError) else (str(exc) or repr(exc))
        write_outcome(path, GpuStageOutcome(
            placement=placement.model_copy(update={"finished_at": _now()}), quantize=quant,
            error_type=type(exc).__name__, error_message=message[:4000]))
        raise
    outcome = GpuStageOutcome(placement=placement.model_copy(update={"finished_at": _now()}),
                              quantize=quant, benchmark=bench)
    write_outcome(path, outcome)
    return outcome


# --------------------------------------------------------------------------- factory side


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
                f"{where} completed but left no outcome at {outcome_path(self.flow_run_id)}: the GPU worker "
                "and the factory must share MODELFACTORY_WORK_DIR (same host, or the same mounted volume)")
        if self.state_type in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "LATE"):
            return GpuStageError(
                f"{where} did not finish within MODELFACTORY_GPU_TIMEOUT_S={get_settings().gpu_timeout_s} s "
                f"(still {self.state_name}; cancelled): are GPU workers running on pool {GPU_POOL!r}? "
                "(infra/gpu-host/start-workers.sh)")
        return GpuStageError(f"{where} ended {self.state_name}: {self.state_message or 'no message'}")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def dispatch_gpu_stage(*, deployment: str, model: ModelArtifact, quantize: QuantSpec, benchmark: BenchmarkSpec,
                       run_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> GpuStageRun:
    """Run the GPU stage as a flow run of *deployment* and wait for it (a subflow of the caller).

    Returns when the run is final or *timeout_s* passed (then the run is cancelled).
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled, Cancelling

    logger = get_logger()
    parameters = {"model": model.model_dump(mode="json"), "quantize": quantize.model_dump(mode="json"),
                  "benchmark": benchmark.model_dump(mode="json")}
    logger.info(f"gpu-stage: dispatching quantize + benchmark to deployment {deployment!r}")
    started = time.perf_counter()
    try:
        flow_run = run_deployment(deployment, parameters=parameters, timeout=timeout_s, poll_interval=poll_s,
                                  idempotency_key=f"{run_id}:gpu-stage", tags=["modelfactory", f"run:{run_id}"])
    except ObjectNotFound as exc:
        raise GpuStageError(
            f"deployment {deployment!r} (MODELFACTORY_GPU_DEPLOYMENT) does not exist on the Prefect server "
            f"{PREFECT_API_URL.value() or '(ephemeral)'}: run `python -m modelfactory.deploy` there, or unset "
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


def run_gpu_stage_remote(recorder: RunRecorder, *, deployment: str, model: ModelArtifact, quantize: QuantSpec,
                         benchmark: BenchmarkSpec, run_id: str) -> tuple[QuantResult, BenchmarkResult]:
    """The factory's GPU steps through the pool: dispatch, record what came back, raise on failure."""
    settings = get_settings()
    stage = dispatch_gpu_stage(deployment=deployment, model=model, quantize=quantize, benchmark=benchmark,
                               run_id=run_id, timeout_s=settings.gpu_timeout_s, poll_s=settings.gpu_poll_s)
    outcome = stage.outcome
    ok = stage.state_type == "COMPLETED" and outcome is not None and outcome.benchmark is not None
    recorder.gpu_stage(stage.detail(), duration_s=stage.run_s or 0.0, ok=ok)
    if outcome is not None and outcome.quantize is not None:
        recorder.quantize(outcome.quantize)  # recorded even when the benchmark then failed
    if not ok:
        raise stage.error()
    assert outcome is not None and outcome.quantize is not None and outcome.benchmark is not None
    recorder.benchmark(outcome.benchmark)
    return outcome.quantize, outcome.benchmark
