"""The GPU stage (quantize + benchmark) as its own Prefect flow run on the ``gpu`` work pool.

Why a separate flow run: the factory's light steps (download, merge, gate, publish, record)
run anywhere, while quantize and benchmark need a GPU. The factory hands the merged model to
the ``gpu-stage`` deployment with :func:`prefect.deployments.run_deployment`; Prefect's work
pool queues the run until a GPU worker has a free slot (one worker per GPU, ``--limit 1``,
``CUDA_VISIBLE_DEVICES`` set per worker: see ``infra/gpu-host/start-workers.sh``).

How the result comes back: the sub-flow writes a small JSON record (:class:`GpuStageOutcome`:
the quantize and benchmark records, where it ran, or the error) as ``gpu-stage/runs/<flow_run_id>.json``
on success *and* on failure, and the factory reads it after the flow run reaches a final state.
With a stage store (``MODELFACTORY_STAGE_STORE_URL``) the record and every output it names are
in the store (``s3://`` URIs): the two sides share no disk. Without one, the record and the
outputs are in the work dir, which both sides must then share (one host, or one mounted volume).
Prefect's own result persistence is not needed.

Crashes: a flow run whose worker or host dies stops sending heartbeats; the ``modelfactory:
crash zombie flow runs`` automation (installed by :mod:`modelfactory.interfaces.deploy`) marks it
``Crashed``, which ends the factory's wait; the factory then fails with
:class:`~modelfactory.core.errors.GpuStageError` and the catalog shows the run ``failed``.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from modelfactory import stage_store
from modelfactory.benchmark.runnability import RunnabilityReport
from modelfactory.core.records import (
    BaselineResult,
    BenchmarkResult,
    QuantResult,
    Record,
)

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
    """What the ``gpu-stage`` flow hands back (as JSON in the work dir).

    A plain or candidate stage fills ``quantize`` and ``benchmark``; a sweep's baseline-only stage
    (no quantization: the fp16 side, measured once for every configuration) fills ``baseline``.
    """

    placement: GpuPlacement
    quantize: QuantResult | None = None
    benchmark: BenchmarkResult | None = None
    #: The plain-transformers check of the artifact on the worker (CPU and its GPU); None: disabled or not reached.
    runnability: RunnabilityReport | None = None
    baseline: BaselineResult | None = None
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


def outcome_name(flow_run_id: str) -> str:
    """The record name of a GPU stage's outcome (in the stage store, else the work dir)."""
    return f"gpu-stage/runs/{flow_run_id}.json"


def outcome_location(flow_run_id: str) -> str:
    """Where the outcome of *flow_run_id* is written: an ``s3://`` URI with a stage store, else a path."""
    return stage_store.record_location(outcome_name(flow_run_id))


def write_outcome(flow_run_id: str, outcome: GpuStageOutcome) -> str:
    """Write *outcome* where the factory reads it (atomically: a reader never sees half); its location."""
    return stage_store.write_record(outcome_name(flow_run_id), outcome.model_dump_json(indent=2).encode())


def read_outcome(flow_run_id: str) -> GpuStageOutcome | None:
    data = stage_store.read_record(outcome_name(flow_run_id))
    return GpuStageOutcome.model_validate_json(data) if data is not None else None
