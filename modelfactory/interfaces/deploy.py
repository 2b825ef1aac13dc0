"""Apply the factory's Prefect setup to a Prefect server: work pools, deployments, automations.

``deployments/prefect.yaml`` is the one declaration of the deployments; this module makes sure
what they need exists and then runs ``prefect --no-prompt deploy`` on that file:

1. the ``gpu`` work pool (type ``process`` by default; ``kubernetes`` with
   ``infra/k8s/gpu-base-job-template.json``), with an optional pool-wide concurrency limit
   (the total number of GPUs behind it), and the ``cpu`` process pool of the factory, sweep, nightly and
   on-finetune deployments (``docs/triggers.md``);
2. every deployment in ``deployments/prefect.yaml`` (or the ones named);
3. the ``modelfactory: crash silent gpu-stage runs`` automation: a ``gpu-stage`` flow run whose
   heartbeats stop (worker or host died) is marked ``Crashed`` after *zombie_after_s* seconds,
   which frees its slot and ends the factory's wait with a clear error.

``python -m modelfactory.interfaces.deploy --gpus 8`` from a checkout (``PREFECT_API_URL`` set) and
``modelfactory deploy`` both call :func:`deploy`. Every failure is a :class:`~modelfactory.core.errors.DeployError`
(bad option, checkout files missing, work pool of another type, ``prefect deploy`` failing, Prefect
server unreachable) whose message names the bad value and what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from modelfactory.core.errors import (
    DeployCommandError,
    DeployOptionError,
    DeploySourceError,
    ModelFactoryError,
    PrefectApiError,
    WorkPoolConflictError,
)

#: Process pool of the light flows: factory (on demand), nightly, on-finetune.
CPU_POOL = "cpu"

#: Flow whose runs the zombie automation watches (the flow in ``flows/gpu_stage.py``).
GPU_FLOW = "gpu-stage"
ZOMBIE_AUTOMATION = "modelfactory: crash silent gpu-stage runs"
#: Heartbeat interval the GPU workers give their flow runs (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``,
#: Prefect's minimum is 30 s); the automation waits a few of them before declaring a run dead.
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 90
SOURCE_DIR_ENV = "MODELFACTORY_SOURCE_DIR"


#: Type of the ``gpu`` work pool: hosts running ``infra/gpu-host`` workers, or Kubernetes jobs.
PoolType = Literal["process", "kubernetes"]
POOL_TYPES: tuple[str, ...] = get_args(PoolType)


def source_dir() -> Path:
    """The checkout holding ``deployments/`` and ``flows/`` (``MODELFACTORY_SOURCE_DIR`` or this one)."""
    env = os.environ.get(SOURCE_DIR_ENV)
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]  # modelfactory/interfaces/ -> root


def prefect_file(*, root: Path | None = None) -> Path:
    return (root or source_dir()) / "deployments" / "prefect.yaml"


def _checkout_file(path: Path) -> Path:
    if not path.is_file():
        raise DeploySourceError(f"{path} does not exist: run from a modelfactory checkout, or point "
                                f"{SOURCE_DIR_ENV} at one (it holds deployments/, flows/ and infra/)")
    return path


def k8s_base_job_template(*, root: Path | None = None) -> dict[str, Any]:
    path = _checkout_file((root or source_dir()) / "infra" / "k8s" / "gpu-base-job-template.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DeploySourceError(f"{path} is not valid JSON ({exc}): restore it from the checkout") from exc


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "(ephemeral, PREFECT_API_URL unset)"


@contextmanager
def _prefect_api(what: str) -> Iterator[None]:
    """Prefect client failures (server down, request refused) as :class:`PrefectApiError`."""
    import httpx

    try:
        yield
    except httpx.HTTPError as exc:  # transport errors and PrefectHTTPStatusError (an HTTPStatusError)
        detail = getattr(getattr(exc, "response", None), "text", "") or str(exc)
        raise PrefectApiError(f"{what} on the Prefect server {_api_url()} failed ({type(exc).__name__}: "
                              f"{detail[:500]}): check PREFECT_API_URL and that the server is up") from exc


def ensure_work_pool(name: str | None = None, *, pool_type: PoolType = "process",
                     concurrency_limit: int | None = None, base_job_template: dict[str, Any] | None = None,
                     description: str = "modelfactory GPU steps: one worker per GPU (--limit 1, CUDA_VISIBLE_DEVICES)",
                     ) -> None:
    """Create work pool *name* (default: the ``gpu`` pool), or update its concurrency limit / base job template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    from modelfactory.gpu_pool import (
        GPU_POOL,  # here: `modelfactory --help` need not import Prefect
    )

    name = name or GPU_POOL
    _check_pool_type(pool_type)
    if base_job_template is None and pool_type == "process":
        from prefect.workers.process import ProcessWorker

        base_job_template = ProcessWorker.get_default_base_job_template()
    with _prefect_api(f"creating/updating work pool {name!r}"), get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=pool_type, concurrency_limit=concurrency_limit,
                base_job_template=base_job_template or {},
                description=description))
            return
        if pool.type != pool_type:
            raise WorkPoolConflictError(
                f"work pool {name!r} exists on {_api_url()} with type {pool.type!r}, not {pool_type!r}: "
                f"deploy with --pool-type {pool.type}, or delete it first (`prefect work-pool delete {name}`)")
        update: dict[str, Any] = {}
        if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
            update["concurrency_limit"] = concurrency_limit
        if base_job_template and pool.base_job_template != base_job_template:
            update["base_job_template"] = base_job_template
        if update:
            client.update_work_pool(name, WorkPoolUpdate(**update))


def _check_pool_type(value: str) -> None:
    if value not in POOL_TYPES:
        raise DeployOptionError(f"work pool type {value!r} is not supported: use "
                                f"{' or '.join(map(repr, POOL_TYPES))}")


def _check_zombie_after(zombie_after_s: float) -> None:
    if zombie_after_s <= HEARTBEAT_S:
        raise DeployOptionError(
            f"zombie timeout {zombie_after_s:g} s is not longer than the workers' heartbeat interval "
            f"({HEARTBEAT_S} s): healthy runs would be marked Crashed; use at least {3 * HEARTBEAT_S} s")


def ensure_zombie_automation(*, zombie_after_s: float = ZOMBIE_AFTER_S, flow_name: str = GPU_FLOW) -> str:
    """Create or update the automation that marks silent *flow_name* runs ``Crashed``; its id.

    Prefect's documented recipe ("detect zombie flows"): after a heartbeat, expect another
    heartbeat (or a final state) within *zombie_after_s*; otherwise change the run to Crashed.
    *zombie_after_s* must exceed the workers' heartbeat interval (3x is safe).
    """
    _check_zombie_after(zombie_after_s)
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
    with _prefect_api(f"installing the automation {ZOMBIE_AUTOMATION!r}"):
        try:
            existing = Automation.read(name=ZOMBIE_AUTOMATION)
        except ValueError:  # Prefect's "automation not found"
            return str(automation.create().id)
        automation.id = existing.id
        automation.update()
        return str(existing.id)


def deploy_from_yaml(*, names: list[str] | None = None, root: Path | None = None,
                     env: dict[str, str] | None = None, timeout_s: float = 300) -> None:
    """``prefect --no-prompt deploy`` on ``deployments/prefect.yaml``, run from the checkout root."""
    from prefect.settings import PREFECT_API_URL

    root = root or source_dir()
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
           str(_checkout_file(prefect_file(root=root)))]
    cmd += [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    api = {"PREFECT_API_URL": PREFECT_API_URL.value()} if PREFECT_API_URL.value() else {}  # this process's server
    shown = " ".join(cmd[2:])
    try:
        proc = subprocess.run(cmd, cwd=root, env={**os.environ, **api, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise DeployCommandError(f"`{shown}` did not finish within {timeout_s:g} s against {_api_url()}: check "
                                 "that the Prefect server answers (prefect server start, PREFECT_API_URL)") from exc
    if proc.returncode != 0:
        raise DeployCommandError(f"`{shown}` failed (exit {proc.returncode}) against {_api_url()}; its output, "
                                 f"which names the problem:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def deploy(*, gpus: int | None = None, names: list[str] | None = None, pool_type: PoolType = "process",
           zombie_after_s: float = ZOMBIE_AFTER_S, root: Path | None = None) -> None:
    """Everything the GPU pool needs on the current Prefect server (``PREFECT_API_URL``); idempotent.

    *gpus*: pool-wide concurrency limit (GPUs over all hosts; ``None`` leaves it unchanged/unset).
    *pool_type*: ``process`` (``infra/gpu-host``) or ``kubernetes`` (``infra/k8s``).
    Options and checkout files are checked before anything on the server changes.
    """
    root = root or source_dir()
    _check_pool_type(pool_type)
    _check_zombie_after(zombie_after_s)
    _checkout_file(prefect_file(root=root))
    template = k8s_base_job_template(root=root) if pool_type == "kubernetes" else None
    ensure_work_pool(pool_type=pool_type, concurrency_limit=gpus, base_job_template=template)  # the gpu pool
    ensure_work_pool(CPU_POOL, pool_type="process", description="modelfactory factory, sweep, nightly and on-finetune "
                     "flows: `prefect worker start --pool cpu --type process`")
    deploy_from_yaml(names=names, root=root)
    ensure_zombie_automation(zombie_after_s=zombie_after_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfactory.interfaces.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="pool-wide limit: GPUs over all GPU hosts")
    parser.add_argument("--name", action="append", dest="names", help="deploy only this deployment (repeatable)")
    parser.add_argument("--pool-type", choices=POOL_TYPES, default="process")
    parser.add_argument("--zombie-after", type=float, default=ZOMBIE_AFTER_S,
                        help="seconds without heartbeat before a gpu-stage run is marked Crashed")
    args = parser.parse_args(argv)
    from modelfactory.gpu_pool import GPU_POOL

    try:
        deploy(gpus=args.gpus, names=args.names, pool_type=args.pool_type, zombie_after_s=args.zombie_after)
    except ModelFactoryError as exc:
        print(f"error ({exc.kind}): {exc.message}", file=sys.stderr)
        return 1
    print(f"deployed {', '.join(args.names or ['all deployments'])} from {prefect_file()} "
          f"(work pools {CPU_POOL!r}, {GPU_POOL!r} ({args.pool_type})); zombie gpu-stage runs crash after "
          f"{args.zombie_after:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
