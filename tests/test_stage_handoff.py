"""Hosts that share no disk, for real: a stage store on a moto S3 server, a `prefect server`, and

(a) a factory side (this process) and a GPU side (``start-workers.sh``, the CPU as the device) with
    different MODELFACTORY_HOMEs and work dirs: the GPU stage's inputs and outputs travel by
    ``s3://`` URI, and so does its outcome record;
(b) two "hosts" (processes with their own homes) running the same spec against one catalog: the
    run-key claim lets one build while the other waits, then reuses the outputs from the store.

Budget: ~6 min on 2 cores (one tiny quantization + benchmark per test, process start-ups).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfactory.catalog import claims, open_catalog
from modelfactory.core.hashing import file_sha256, step_key
from modelfactory.core.specs import parse_spec
from modelfactory.gpu_pool import read_outcome
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.env import REPO
from modelfactory.testing.env import settings_env as env_settings
from modelfactory.testing.models import make_lora
from modelfactory.testing.pool import diagnostics, dispatching_to_gpu_pool, pool_spec
from modelfactory.testing.prefect_server import (
    GpuHostWorkers,
    PrefectServer,
    child_env,
    prefect_api,
    started,
    wait_for,
)
from modelfactory.testing.s3_server import fresh_bucket

pytestmark = pytest.mark.pool


@pytest.fixture(scope="module")
def store(moto_s3) -> Iterator[str]:
    """A bucket on the moto server; AWS test credentials and its endpoint for this process and children."""
    with fresh_bucket(moto_s3, name="mf-stage", prefix="stage") as url:
        yield url


@pytest.fixture(scope="module")
def factory_side(store, tmp_path_factory) -> Iterator[Path]:
    """This process is the factory host: its own work dir and stage cache, the stage store."""
    root = tmp_path_factory.mktemp("factory-side")
    with env_settings(MODELFACTORY_WORK_DIR=str(root / "work"), MODELFACTORY_STAGE_CACHE_DIR=str(root / "cache"),
                      MODELFACTORY_STAGE_STORE_URL=store):
        yield root


@pytest.fixture(scope="module")
def server(factory_side, tmp_path_factory) -> Iterator[PrefectServer]:
    with started(PrefectServer(tmp_path_factory.mktemp("prefect-server"))) as server:
        yield server


@pytest.fixture(scope="module")
def gpu_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-side")


@pytest.fixture(scope="module")
def gpu_workers(server, store, gpu_home, tmp_path_factory) -> Iterator[GpuHostWorkers]:
    """The GPU host: the gpu-stage deployment and one worker whose home, work dir and cache are its own."""
    from modelfactory.interfaces.deploy import deploy

    with prefect_api(server):
        deploy(gpus=1, names=["gpu"])
        workers = GpuHostWorkers(server, tmp_path_factory.mktemp("gpu-workers"), gpu_ids="0",
                                 MODELFACTORY_HOME=str(gpu_home),
                                 MODELFACTORY_WORK_DIR=str(gpu_home / "work"),
                                 MODELFACTORY_STAGE_CACHE_DIR=str(gpu_home / "cache" / "stage"),
                                 MODELFACTORY_STAGE_STORE_URL=store)
        with started(workers), dispatching_to_gpu_pool():
            yield workers


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def text_mentions(root: Path, needle: str) -> list[Path]:
    """Files under *root* whose bytes (or path) contain *needle*."""
    return [p for p in files_under(root) if needle in str(p) or needle.encode() in p.read_bytes()]


# --------------------------------------------------------------------------- (a) the GPU stage by URI


def test_gpu_stage_outputs_come_back_by_uri_and_are_fetched_and_checked(
        gpu_workers, factory_side, gpu_home, store, tiny_llama, tmp_path):
    lora = make_lora(tiny_llama, tmp_path / "lora")
    spec = pool_spec(tiny_llama, "handoff", adapters=[{"uri": str(lora)}])
    with diagnostics(gpu_workers):
        outcome = run_factory(spec)
    assert outcome.status == "passed", outcome
    detail = open_catalog().get_run(outcome.run_id)
    steps = {s.name: s for s in detail.steps}
    assert steps["gpu-stage"].detail["state"] == "COMPLETED"
    for name in ("download", "merge", "quantize", "benchmark"):  # every step output by URI
        assert steps[name].output_uri.startswith(f"{store}/{name}/"), (name, steps[name].output_uri)
    assert steps["quantize"].status == "ok" and steps["benchmark"].status == "ok"

    # The GPU side built quantize + benchmark in its own work dir, from the merged model it fetched.
    quant_key = steps["quantize"].output_uri.rstrip("/").rsplit("/", 1)[-1]
    gpu_quant = gpu_home / "work" / "quantize" / quant_key
    assert (gpu_quant / "_COMPLETE.json").is_file()
    assert [p for p in (gpu_home / "cache" / "stage" / "objects").iterdir() if p.is_dir()]  # the merged model
    assert not (gpu_home / "catalog.db").exists()  # the GPU side never needs the catalog

    # Its outcome came through the store, not a file on a shared disk.
    flow_run_id = steps["gpu-stage"].detail["flow_run_id"]
    record = read_outcome(flow_run_id)
    assert record is not None and record.quantize.model.path == steps["quantize"].output_uri
    assert record.benchmark.path == steps["benchmark"].output_uri
    assert not (factory_side / "work" / "gpu-stage").exists()

    # The factory side fetched the quantized model (to publish it) into its cache, every file checked.
    work = factory_side / "work"
    assert not (work / "quantize").exists() and not (work / "benchmark").exists()
    (fetched,) = [p for p in (factory_side / "cache" / "objects").iterdir() if p.is_dir()
                  and (p / "quantize_config.json").is_file()]
    gpu_files = {p.relative_to(gpu_quant).as_posix(): file_sha256(p) for p in files_under(gpu_quant)
                 if p.name != "_COMPLETE.json"}
    assert {p.relative_to(fetched).as_posix(): file_sha256(p) for p in files_under(fetched)
            if p.name != "_COMPLETE.json"} == gpu_files
    # _COMPLETE.json means one thing on both sides: the output's files and what the step recorded (the cache's
    # copy is the store's, which adds where the files are and who uploaded them).
    gpu_marker, cached_marker = (json.loads((f / "_COMPLETE.json").read_text()) for f in (gpu_quant, fetched))
    assert cached_marker["files"] == gpu_marker["files"] and cached_marker["quantize_s"] == gpu_marker["quantize_s"]
    published = json.loads(Path(outcome.artifact_uri.removeprefix("file://"), "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in published["files"]} == gpu_files

    # No path of the GPU host anywhere on the factory side (work dir, cache, catalog records).
    assert text_mentions(factory_side, str(gpu_home)) == []
    assert not any(str(gpu_home) in (s.output_uri or "") + json.dumps(s.detail) for s in detail.steps)


# --------------------------------------------------------------------------- (b) the lock across hosts

HOST = textwrap.dedent("""
    import json, sys
    from modelfactory.interfaces.runner import run_factory
    outcome = run_factory(json.loads(sys.argv[1]), run_id=sys.argv[2])
    print("OUTCOME " + outcome.model_dump_json(), flush=True)
""")


def start_host(name: str, root: Path, spec: dict, *, server: PrefectServer, store: str, catalog_url: str,
               run_id: str) -> tuple[subprocess.Popen, Path]:
    """One factory host: a process with its own home (work dir, cache, Prefect home), the shared
    catalog, stage store and publish store; GPU steps in its own process."""
    home = root / name
    home.mkdir(parents=True)
    env = child_env(PYTHONPATH=str(REPO), PREFECT_API_URL=server.api_url, PREFECT_HOME=str(home / "prefect"),
                    MODELFACTORY_HOME=str(home), MODELFACTORY_CATALOG_URL=catalog_url,
                    MODELFACTORY_STAGE_STORE_URL=store, MODELFACTORY_STORE_URL=store.replace("/stage", "/published"),
                    MODELFACTORY_CLAIM_POLL_S="1")
    for name_ in ("MODELFACTORY_WORK_DIR", "MODELFACTORY_STAGE_CACHE_DIR"):
        env.pop(name_, None)
    log = home / "host.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", HOST, json.dumps(spec), run_id], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finished(proc: subprocess.Popen, log: Path, timeout: float) -> dict:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("OUTCOME ")]
    assert proc.returncode == 0 and lines, f"{log} (exit {proc.returncode}):\n{text[-6000:]}"
    return json.loads(lines[-1].removeprefix("OUTCOME "))


def test_two_hosts_one_catalog_one_builds_the_other_waits_then_reuses(server, store, tiny_llama, tmp_path):
    catalog_url = f"sqlite:///{tmp_path / 'shared-catalog' / 'catalog.db'}"
    spec = pool_spec(tiny_llama, "two-hosts", quantize={  # a quantization no other test built
        "bits": 4, "group_size": 32, "calibration": {"num_samples": 7, "seq_len": 64}})
    run_key = step_key("run", spec=parse_spec(spec))
    catalog = open_catalog(catalog_url)
    first, first_log = start_host("host-a", tmp_path, spec, server=server, store=store, catalog_url=catalog_url,
                                  run_id=str(uuid.uuid4()))
    wait_for("host-a to claim the run key", lambda: claims.current(catalog, run_key) or first.poll() is not None,
             timeout=300, diagnostics=lambda: first_log.read_text(errors="replace")[-4000:])
    assert first.poll() is None, first_log.read_text(errors="replace")[-4000:]
    second, second_log = start_host("host-b", tmp_path, spec, server=server, store=store, catalog_url=catalog_url,
                                    run_id=str(uuid.uuid4()))
    a, b = finished(first, first_log, 900), finished(second, second_log, 900)

    assert a["status"] == b["status"] == "passed" and a["artifact_uri"] == b["artifact_uri"]
    waited = second_log.read_text(errors="replace")
    assert f"an identical run (key {run_key[:12]}) is in progress on" in waited and f"run {a['run_id']}" in waited
    statuses = {run: {s.name: s.status for s in catalog.get_run(run).steps} for run in (a["run_id"], b["run_id"])}
    assert statuses[a["run_id"]]["quantize"] == "ok" and statuses[a["run_id"]]["benchmark"] == "ok"
    assert statuses[b["run_id"]]["quantize"] == "reused" and statuses[b["run_id"]]["benchmark"] == "reused"
    # Host b built nothing: its work dir has no quantization or benchmark; it reused them from the store.
    assert not (tmp_path / "host-b" / "work" / "quantize").exists()
    assert not (tmp_path / "host-b" / "work" / "benchmark").exists()
    assert (tmp_path / "host-a" / "work" / "quantize").is_dir()
    assert claims.current(catalog, run_key) is None  # released by both
    catalog.dispose()
