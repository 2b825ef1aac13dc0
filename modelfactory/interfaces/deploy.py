"""Apply the factory's Prefect setup to a Prefect server: work pools, deployments, automations.

``deployments/prefect.yaml`` is the one declaration of the deployments; this module makes sure
what they need exists and then runs ``prefect --no-prompt deploy`` on that file:

1. the ``gpu`` work pool (type ``process`` by default; ``kubernetes`` with
   ``infra/k8s/gpu-base-job-template.json``), with an optional pool-wide concurrency limit
   (the total number of GPUs behind it), and the ``cpu`` process pool of the factory, nightly and
   on-finetune deployments (``docs/triggers.md``);
2. every deployment in ``deployments/prefect.yaml`` (or the ones named);
3. the ``modelfactory: crash silent gpu-stage runs`` automation: a ``gpu-stage`` flow run whose
   heartbeats stop (worker or host died) is marked ``Crashed`` after *zombie_after_s* seconds,
   which frees its slot and ends the factory's wait with a clear error.

``python -m modelfactory.interfaces.deploy --gpus 8`` from a checkout (``PREFECT_API_URL`` set); the same as
:func:`deploy` (what ``modelfactory deploy`` should call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from modelfactory.gpu_pool import GPU_POOL

#: Process pool of the light flows: factory (on demand), nightly, on-finetune.
CPU_POOL = "cpu"

#: Flow whose runs the zombie automation watches (the flow in ``flows/gpu_stage.py``).
GPU_FLOW = "gpu-stage"
ZOMBIE_AUTOMATION = "modelfactory: crash silent gpu-stage runs"
#: Heartbeat interval the GPU workers give their flow runs (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``,
#: Prefect's minimum is 30 s); the automation waits a few of them before declaring a run dead.
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 90


def source_dir() -> Path:
    """The checkout holding ``deployments/`` and ``flows/`` (``MODELFACTORY_SOURCE_DIR`` or this one)."""
    env = os.environ.get("MODELFACTORY_SOURCE_DIR")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]


def prefect_file(root: Path | None = None) -> Path:
    return (root or source_dir()) / "deployments" / "prefect.yaml"


def k8s_base_job_template(root: Path | None = None) -> dict[str, Any]:
    return json.loads(((root or source_dir()) / "infra" / "k8s" / "gpu-base-job-template.json").read_text())


def ensure_work_pool(name: str = GPU_POOL, *, pool_type: str = "process", concurrency_limit: int | None = None,
                     base_job_template: dict[str, Any] | None = None,
                     description: str = "modelfactory GPU steps: one worker per GPU (--limit 1, CUDA_VISIBLE_DEVICES)",
                     ) -> None:
    """Create work pool *name*, or update its concurrency limit / base job template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    if base_job_template is None and pool_type == "process":
        from prefect.workers.process import ProcessWorker

        base_job_template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=pool_type, concurrency_limit=concurrency_limit,
                base_job_template=base_job_template or {},
                description=description))
            return
        if pool.type != pool_type:
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}: "
                             "delete it or pick another pool name")
        update: dict[str, Any] = {}
        if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
            update["concurrency_limit"] = concurrency_limit
        if base_job_template and pool.base_job_template != base_job_template:
            update["base_job_template"] = base_job_template
        if update:
            client.update_work_pool(name, WorkPoolUpdate(**update))


def ensure_zombie_automation(*, zombie_after_s: float = ZOMBIE_AFTER_S, flow_name: str = GPU_FLOW) -> str:
    """Create or update the automation that marks silent *flow_name* runs ``Crashed``; its id.

    Prefect's documented recipe ("detect zombie flows"): after a heartbeat, expect another
    heartbeat (or a final state) within *zombie_after_s*; otherwise change the run to Crashed.
    *zombie_after_s* must exceed the workers' heartbeat interval (3x is safe).
    """
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"Mark {flow_name} flow runs Crashed when they stop sending heartbeats "
                    f"for {zombie_after_s:.0f} s (their worker or host died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": flow_name}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=zombie_after_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {zombie_after_s:.0f} s: the worker or host running this flow run died",
        )],
    )
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        return str(automation.create().id)
    automation.id = existing.id
    automation.update()
    return str(existing.id)


def deploy_from_yaml(*, names: list[str] | None = None, root: Path | None = None,
                     env: dict[str, str] | None = None, timeout_s: float = 300) -> None:
    """``prefect --no-prompt deploy`` on ``deployments/prefect.yaml``, run from the checkout root."""
    from prefect.settings import PREFECT_API_URL

    root = root or source_dir()
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file(root))]
    cmd += [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    api = {"PREFECT_API_URL": PREFECT_API_URL.value()} if PREFECT_API_URL.value() else {}  # this process's server
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, **api, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")


def deploy(*, gpus: int | None = None, names: list[str] | None = None, pool_type: str = "process",
           zombie_after_s: float = ZOMBIE_AFTER_S, root: Path | None = None) -> None:
    """Everything the GPU pool needs on the current Prefect server (``PREFECT_API_URL``); idempotent.

    *gpus*: pool-wide concurrency limit (GPUs over all hosts; ``None`` leaves it unchanged/unset).
    *pool_type*: ``process`` (``infra/gpu-host``) or ``kubernetes`` (``infra/k8s``).
    """
    root = root or source_dir()
    template = k8s_base_job_template(root) if pool_type == "kubernetes" else None
    ensure_work_pool(GPU_POOL, pool_type=pool_type, concurrency_limit=gpus, base_job_template=template)
    ensure_work_pool(CPU_POOL, pool_type="process", description="modelfactory factory, nightly and on-finetune "
                     "flows: `prefect worker start --pool cpu --type process`")
    deploy_from_yaml(names=names, root=root)
    ensure_zombie_automation(zombie_after_s=zombie_after_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfactory.interfaces.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="pool-wide limit: GPUs over all GPU hosts")
    parser.add_argument("--name", action="append", dest="names", help="deploy only this deployment (repeatable)")
    parser.add_argument("--pool-type", choices=("process", "kubernetes"), default="process")
    parser.add_argument("--zombie-after", type=float, default=ZOMBIE_AFTER_S,
                        help="seconds without heartbeat before a gpu-stage run is marked Crashed")
    args = parser.parse_args(argv)
    deploy(gpus=args.gpus, names=args.names, pool_type=args.pool_type, zombie_after_s=args.zombie_after)
    print(f"deployed {', '.join(args.names or ['all deployments'])} from {prefect_file()} "
          f"(work pools {CPU_POOL!r}, {GPU_POOL!r} ({args.pool_type})); zombie gpu-stage runs crash after "
          f"{args.zombie_after:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
