"""A sweep through the GPU pool, for real: a `prefect server`, `modelfactory deploy` (the `sweep` and
`gpu-stage` deployments), `infra/gpu-host/start-workers.sh` with two CPU slots
(CUDA_VISIBLE_DEVICES=0 and 1), and a 3-configuration sweep of the tiny model dispatching one
baseline-only GPU stage, then one GPU stage per member, concurrently.

Budget: ~4 min on 2 cores.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from modelfactory.catalog import open_catalog
from modelfactory.gpu_pool import read_outcome
from modelfactory.interfaces.runner import run_sweep
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import tiny_spec
from modelfactory.testing.pool import dispatching_to_gpu_pool
from modelfactory.testing.prefect_server import (
    GpuHostWorkers,
    PrefectServer,
    api,
    prefect_api,
    started,
)

pytestmark = pytest.mark.pool

CONFIGS = [{"group_size": 32}, {"group_size": 64}, {"bits": 8, "group_size": 32}]


@pytest.fixture(scope="module", autouse=True)
def _own_work_dir(factory_home, tmp_path_factory):
    """Set before the workers start, so their flow runs share this work dir (and reuse nothing else)."""
    with own_work_dir(tmp_path_factory.mktemp("sweep-pool-work")):
        yield


@pytest.fixture(scope="module")
def pool(factory_home, tmp_path_factory) -> Iterator[PrefectServer]:
    from modelfactory.interfaces.deploy import deploy

    with started(PrefectServer(tmp_path_factory.mktemp("prefect-server"))) as server, prefect_api(server):
        deploy(gpus=2)
        with dispatching_to_gpu_pool():
            yield server


@pytest.fixture(scope="module")
def workers(pool, tmp_path_factory) -> Iterator[GpuHostWorkers]:
    with started(GpuHostWorkers(pool, tmp_path_factory.mktemp("gpu-host"), gpu_ids="0,1")) as workers:
        yield workers


def tagged_runs(server: PrefectServer, tag: str) -> list[dict[str, Any]]:
    return api(server, "POST", "/flow_runs/filter", flow_runs={"tags": {"all_": [tag]}})


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def test_the_sweep_deployment_has_its_form(pool):
    dep = api(pool, "GET", "/deployments/name/sweep/sweep")
    assert dep["work_pool_name"] == "cpu"
    schema = dep["parameter_openapi_schema"]
    assert schema["required"] == ["spec"]
    sweep = schema["definitions"]["SweepSpec"]["properties"]
    assert sweep["objective"]["enum"] == ["speed", "size", "memory", "quality"] and sweep["objective"]["default"] == "quality"
    assert sweep["publish_mode"]["enum"] == ["winner", "all_passing", "none"]
    assert "group_size" in schema["definitions"]["QuantGrid"]["properties"]


def test_a_sweep_fans_its_members_out_over_the_pool(pool, workers, tiny_llama):
    base = tiny_spec(tiny_llama)
    spec = {"name": "pool-sweep", "base": base["base"], "quantize": base["quantize"], "benchmark": base["benchmark"],
            "configs": CONFIGS, "gate": {"preset": "none", "max_ppl_increase_pct": 50.0}, "objective": "speed",
            "publish": {"name": "pool-sweep"}}
    try:
        outcome = run_sweep(spec)
    except BaseException:
        print(workers.worker_logs(120))
        raise
    assert [m.status for m in outcome.members] == ["passed"] * 3, outcome
    assert outcome.winner is not None and outcome.winner.published

    # The fp16 side: one baseline-only GPU stage for the whole sweep.
    (fp16,) = tagged_runs(pool, f"run:{outcome.sweep_id}")
    assert fp16["state"]["type"] == "COMPLETED" and fp16["parameters"]["quantize"] is None
    baseline = read_outcome(fp16["id"])
    assert baseline is not None and baseline.baseline is not None and baseline.quantize is None
    assert baseline.baseline.path == outcome.baseline_path

    detail = open_catalog().get_sweep(outcome.sweep_id)
    assert detail.status == "finished" and detail.winner_run_id == outcome.winner_run_id
    stages = {}
    for member in detail.members:
        (run,) = tagged_runs(pool, f"run:{member.run_id}")
        assert run["state"]["type"] == "COMPLETED" and run["parameters"]["baseline"]["path"] == outcome.baseline_path
        assert member.cuda_visible_devices in ("0", "1") and member.gpu_stage_s is not None
        steps = {s.name: s for s in open_catalog().get_run(member.run_id).steps}
        assert steps["gpu-stage"].detail["flow_run_id"] == run["id"]
        assert steps["gpu-stage"].detail["cuda_visible_devices"] == member.cuda_visible_devices
        stages[member.label] = (run, member.cuda_visible_devices)

    # Concurrently: some two member stages overlapped, each holding its own slot.
    overlapping = [(a, b) for (a, b) in itertools.combinations(stages.values(), 2)
                   if when(a[0]["start_time"]) < when(b[0]["end_time"]) and when(b[0]["start_time"]) < when(a[0]["end_time"])]
    intervals = {label: (run["start_time"], run["end_time"], slot) for label, (run, slot) in stages.items()}
    assert overlapping, f"no two member GPU stages overlapped: {intervals}"
    assert all(a[1] != b[1] for a, b in overlapping), f"overlapping stages shared a slot: {intervals}"
    assert {slot for _, slot in stages.values()} == {"0", "1"}
