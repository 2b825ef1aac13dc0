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
crash zombie flow runs`` automation (installed by :mod:`modelfactory.interfaces.deploy`) marks it
``Crashed``, which ends the factory's wait; the factory then fails with
:class:`~modelfactory.core.errors.GpuStageError` and the catalog shows the run ``failed``.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path

from modelfactory.core.records import BenchmarkResult, QuantResult, Record
from modelfactory.core.settings import get_settings

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


def now_iso() -> str:
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
                        started_at=now_iso())


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
