"""The GPU work pool, for real: a `prefect server`, `infra/gpu-host/start-workers.sh` (one process
worker, CUDA_VISIBLE_DEVICES=0, --limit 1; the CPU plays the GPU), the `gpu-stage` deployment
from `deployments/prefect.yaml`, and the factory dispatching its GPU steps with `run_deployment`.

Budget: ~5 min on 2 cores (three tiny quantizations, four tiny benchmarks, one ~60 s crash wait).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import yaml

from modelfactory.catalog import open_catalog
from modelfactory.core.errors import GpuStageError
from modelfactory.gpu_pool import DEFAULT_GPU_DEPLOYMENT, read_outcome
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.env import settings_env as env_settings
from modelfactory.testing.pool import diagnostics, dispatching_to_gpu_pool, in_thread, pool_spec, when
from modelfactory.testing.prefect_server import (
    REPO,
    START_WORKERS,
    GpuHostWorkers,
    PrefectServer,
    api,
    prefect_api,
    started,
    wait_for,
)

pytestmark = pytest.mark.pool

#: Seconds without heartbeat before the automation crashes a gpu-stage run (workers beat every 30 s).
ZOMBIE_AFTER_S = 60
GPU_STEPS = ["download", "merge", "gpu-stage", "quantize", "runnability", "benchmark", "gate", "publish"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _own_work_dir(factory_home, tmp_path_factory):
    """Steps finished by other test modules must not be reused here: the pool must do the work.
    Set before the workers start, so their flow runs share this work dir."""
    with own_work_dir(tmp_path_factory.mktemp("pool-work")):
        yield


@pytest.fixture(scope="module")
def server(factory_home, tmp_path_factory) -> Iterator[PrefectServer]:
    with started(PrefectServer(tmp_path_factory.mktemp("prefect-server"))) as server:
        yield server


@pytest.fixture(scope="module")
def pool(server) -> Iterator[PrefectServer]:
    """The server with the gpu pool, the gpu-stage deployment and the zombie automation; this
    process's flows talk to it and dispatch their GPU steps to it."""
    from modelfactory.interfaces.deploy import deploy

    with prefect_api(server):
        deploy(gpus=1, zombie_after_s=ZOMBIE_AFTER_S)
        with dispatching_to_gpu_pool():
            yield server


@pytest.fixture(scope="module")
def workers(pool, tmp_path_factory) -> Iterator[GpuHostWorkers]:
    with started(GpuHostWorkers(pool, tmp_path_factory.mktemp("gpu-host"), gpu_ids="0")) as workers:
        yield workers


def flow_run(server: PrefectServer, flow_run_id: str) -> dict[str, Any]:
    return api(server, "GET", f"/flow_runs/{flow_run_id}")


def gpu_stage_runs(server: PrefectServer, run_id: str) -> list[dict[str, Any]]:
    """The gpu-stage flow runs a factory run created (tagged ``run:<id>``)."""
    return api(server, "POST", "/flow_runs/filter", flow_runs={"tags": {"all_": [f"run:{run_id}"]}})


def join(thread: threading.Thread, box: dict[str, Any], timeout: float, workers: GpuHostWorkers) -> dict[str, Any]:
    thread.join(timeout)
    assert not thread.is_alive(), f"factory run still going after {timeout:.0f} s\n{workers.worker_logs()}"
    return box


def decode_tokens(n: int) -> dict:
    """Benchmark settings that differ from the others only in decode length (a fresh benchmark)."""
    return {"perplexity": {"context_len": 128, "stride": 128, "max_tokens": 1024},
            "decode": {"new_tokens": n, "repeats": 1}}


# --------------------------------------------------------------------------- infra files (no server)


def test_infra_files_declare_the_gpu_pool_setup():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio"} <= set(services)
    for name in ("postgres", "prefect-server", "minio"):
        assert services[name]["healthcheck"]["test"], name
    server = services["prefect-server"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "3.8.8" in server["image"]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"

    template = json.loads((REPO / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    assert env["HF_HOME"] == mounts["model-cache"]                  # model cache survives pods
    assert env["MODELFACTORY_CACHE_DIR"] == mounts["kernel-cache"]  # kernel JIT cache survives pods
    assert env["MODELFACTORY_WORK_DIR"].startswith(mounts["work"])
    for name in ("model-cache", "kernel-cache", "work"):
        assert "persistentVolumeClaim" in volumes[name], name

    # The manifest renders with the pool's defaults (Prefect's own templating) into a GPU job.
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    manifest = apply_values(template["job_configuration"]["job_manifest"], {**defaults, "name": "gpu-stage-x"})
    pod = manifest["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "modelfactory-hf-cache"
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "96Gi", "nvidia.com/gpu": 1}

    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    (gpu,) = [d for d in deployments["deployments"] if d["name"] == "gpu"]
    assert gpu["entrypoint"] == "flows/gpu_stage.py:gpu_stage" and gpu["work_pool"]["name"] == "gpu"

    script = subprocess.run(["bash", "-n", str(START_WORKERS)], capture_output=True, text=True)
    assert script.returncode == 0, script.stderr

    # `modelfactory deploy` finds the checkout it deploys from (deployments/ and flows/).
    from modelfactory.interfaces.deploy import prefect_file, source_dir

    if "MODELFACTORY_SOURCE_DIR" not in os.environ:
        assert source_dir() == REPO and prefect_file().is_file()


def test_gpu_stage_end_states_map_to_the_factory_errors():
    from modelfactory.core.errors import QuantizationError
    from modelfactory.gpu_pool import GpuPlacement, GpuStageOutcome, GpuStageRun

    placement = GpuPlacement(flow_run_id="f", hostname="h", pid=1, cuda_visible_devices="3", device="cpu",
                             started_at="t")
    run = GpuStageRun(deployment="gpu-stage/gpu", flow_run_id="f", flow_run_name="n", state_type="FAILED",
                      state_name="Failed", state_message="boom", queued_s=1.0, run_s=2.0, outcome=None)
    failed = run.model_copy(update={"outcome": GpuStageOutcome(
        placement=placement, error_type="QuantizationError", error_message="out of memory quantizing x")})
    error = failed.error()
    assert type(error) is QuantizationError and error.message == "out of memory quantizing x"
    assert failed.detail()["cuda_visible_devices"] == "3" and failed.detail()["state"] == "FAILED"
    crashed = run.model_copy(update={"state_type": "CRASHED", "state_name": "Crashed"}).error()
    assert isinstance(crashed, GpuStageError) and "crashed" in str(crashed) and "'n' (f)" in str(crashed)
    lost = run.model_copy(update={"state_type": "COMPLETED", "state_name": "Completed"}).error()
    assert "MODELFACTORY_WORK_DIR" in str(lost)
    assert "ended Failed: boom" in str(run.error())


# --------------------------------------------------------------------------- the pool, for real


def test_unknown_deployment_fails_clearly(pool, tiny_llama):
    with env_settings(MODELFACTORY_GPU_DEPLOYMENT="gpu-stage/nope"):
        with pytest.raises(GpuStageError, match=r"'gpu-stage/nope' .* does not exist .* modelfactory.interfaces.deploy"):
            run_factory(pool_spec(tiny_llama, "pool-nope"))
    (run,) = open_catalog().list_runs(limit=1)
    assert run.status == "failed" and "gpu-stage/nope" in run.error


def test_server_accepts_the_kubernetes_base_job_template(pool):
    """The Prefect server validates the template (every placeholder declared as a variable)."""
    from modelfactory.interfaces.deploy import ensure_work_pool, k8s_base_job_template

    template = k8s_base_job_template()
    ensure_work_pool("gpu-k8s", pool_type="kubernetes", base_job_template=template, concurrency_limit=8)
    created = api(pool, "GET", "/work_pools/gpu-k8s")
    assert created["type"] == "kubernetes" and created["concurrency_limit"] == 8
    assert created["base_job_template"] == template


def test_factory_runs_its_gpu_steps_on_the_pool(pool, workers, tiny_llama):
    with diagnostics(workers):
        outcome = run_factory(pool_spec(tiny_llama, "pool-a"))
        assert outcome.status == "passed", outcome
        detail = open_catalog().get_run(outcome.run_id)
        assert detail.status == "passed" and detail.error is None
        assert [s.name for s in detail.steps] == GPU_STEPS
        steps = {s.name: s for s in detail.steps}
        assert steps["quantize"].status == "ok" and steps["benchmark"].status == "ok"
        assert detail.metric("perplexity", "gptq") is not None and detail.metric("quantize_s", "gptq") is not None

        gpu = steps["gpu-stage"].detail
        assert gpu["state"] == "COMPLETED" and gpu["deployment"] == DEFAULT_GPU_DEPLOYMENT
        assert gpu["cuda_visible_devices"] == "0"  # the slot the worker holds

        sub = flow_run(pool, gpu["flow_run_id"])
        assert sub["state"]["type"] == "COMPLETED" and sub["work_pool_name"] == "gpu"
        assert sub["parent_task_run_id"] is not None  # a subflow of the factory run in the Prefect UI
        deployment = api(pool, "GET", f"/deployments/{sub['deployment_id']}")
        assert deployment["name"] == "gpu"
        # It ran in the worker's flow-run process, not here.
        placement = read_outcome(gpu["flow_run_id"]).placement
        assert placement.pid != os.getpid() and placement.cuda_visible_devices == "0"


def test_two_factory_runs_with_one_gpu_slot_run_one_after_the_other(pool, workers, tiny_llama):
    # Same quantization as above (reused), distinct benchmarks: each GPU stage does real work.
    specs = [pool_spec(tiny_llama, f"pool-{n}", benchmark=decode_tokens(n)) for n in (9, 10)]
    with diagnostics(workers):
        started = [in_thread(run_factory, spec) for spec in specs]
        outcomes = [join(thread, box, 600, workers) for thread, box in started]
        for box in outcomes:
            assert "error" not in box, box.get("error")
            assert box["value"].status == "passed", box["value"]
        runs = []
        for box in outcomes:
            detail = open_catalog().get_run(box["value"].run_id)
            steps = {s.name: s for s in detail.steps}
            assert steps["benchmark"].status == "ok"
            assert steps["gpu-stage"].detail["cuda_visible_devices"] == "0"
            runs.append(flow_run(pool, steps["gpu-stage"].detail["flow_run_id"]))
        first, second = sorted(runs, key=lambda r: when(r["start_time"]))
        intervals = [(r["name"], r["expected_start_time"], r["start_time"], r["end_time"]) for r in (first, second)]
        assert when(first["end_time"]) <= when(second["start_time"]), f"GPU stages overlapped: {intervals}"
        # Both were submitted while the first ran: the second waited in the queue for the slot.
        assert when(second["expected_start_time"]) < when(first["end_time"]), intervals


def test_killed_worker_crashes_its_run_the_catalog_says_so_and_a_rerun_completes(pool, workers, tiny_llama):
    spec = pool_spec(tiny_llama, "pool-crash", quantize={
        "bits": 4, "group_size": 32, "calibration": {"num_samples": 9, "seq_len": 64}})  # a fresh quantization
    run_id = "0c0ffee0-0000-4000-8000-00000000c4a5"
    with diagnostics(workers):
        thread, box = in_thread(run_factory, spec, run_id=run_id)

        def quantizing() -> dict | None:
            (sub,) = gpu_stage_runs(pool, run_id) or [None]
            if sub is None or sub["state"]["type"] != "RUNNING":
                return None
            tasks = api(pool, "POST", "/task_runs/filter", flow_runs={"id": {"any_": [sub["id"]]}})
            return sub if any(t["name"].startswith("quantize") for t in tasks) else None

        sub = wait_for("the gpu-stage run to start quantizing", quantizing, timeout=180,
                       diagnostics=workers.worker_logs)
        time.sleep(2)
        killed = workers.kill_hard()  # the worker, its flow-run process and the quantization: a host dying
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in killed)
        assert len(killed) >= 3, killed  # script, worker, flow-run process (and GPTQ's worker process)

        # Prefect's zombie automation marks the silent run Crashed; the factory's wait ends with it.
        box = join(thread, box, ZOMBIE_AFTER_S + 90, workers)
        error = box.get("error")
        assert isinstance(error, GpuStageError) and "crashed" in str(error), box
        assert flow_run(pool, sub["id"])["state"]["type"] == "CRASHED"
        detail = open_catalog().get_run(run_id)
        assert detail.status == "failed" and detail.error_kind == "gpu_stage"
        assert "GPU stage" in detail.error and "crashed" in detail.error and sub["id"] in detail.error
        steps = {s.name: s for s in detail.steps}
        assert steps["gpu-stage"].status == "failed" and steps["gpu-stage"].detail["state"] == "CRASHED"
        assert "publish" not in steps

        # With no worker, a bounded wait gives up, cancels the queued run and says why.
        with env_settings(MODELFACTORY_GPU_TIMEOUT_S="3"):
            with pytest.raises(GpuStageError, match="did not finish within"):
                run_factory(spec, run_id="0c0ffee0-0000-4000-8000-0000000071e0")
        (queued,) = gpu_stage_runs(pool, "0c0ffee0-0000-4000-8000-0000000071e0")
        assert flow_run(pool, queued["id"])["state"]["type"] == "CANCELLED"
        assert open_catalog().get_run("0c0ffee0-0000-4000-8000-0000000071e0").status == "failed"

        # A restarted worker takes the re-triggered run; nothing of the killed build was kept.
        workers.start_and_wait()
        again = run_factory(spec)
        assert again.status == "passed", again
        steps = {s.name: s for s in open_catalog().get_run(again.run_id).steps}
        assert steps["gpu-stage"].detail["state"] == "COMPLETED" and steps["quantize"].status == "ok"
