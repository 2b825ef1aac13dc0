"""What is published is what was measured, under concurrency and faults (issue 24), on the real parts:
a `prefect server`, two GPU hosts (`infra/gpu-host/start-workers.sh`, the CPU as their device) with
separate homes, a stage store on a moto S3 server, a PostgreSQL catalog, and two factory sides
(processes with their own homes) running two overlapping sweeps of the tiny model: three
configurations each, one of them shared.

While they run, one GPU host is SIGKILLed mid-quantize (and started again), and one factory side
is SIGKILLed mid-publish (files up, manifest not yet written). Then `catalog reconcile` and a rerun
of whatever failed. Afterwards:

- no run and no sweep is left ``running``;
- every published manifest's file hashes equal those of the weights its run's benchmark loaded;
- each step key has exactly one output in the store (one marker, the files of one attempt);
- every failure has a clear, recorded reason.

No timing thresholds. Budget: 4-8 min on 2 shared cores (about ten tiny GPU stages, one ~90 s crash wait;
3:34 for the test itself on 2026-12-07, 7:37 while another suite ran).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from modelfactory.catalog import open_catalog
from modelfactory.catalog.recovery import reconcile
from modelfactory.core.manifest import content_digest
from modelfactory.publishing.artifacts import verify_artifact
from modelfactory.testing.catalog import PostgresUnavailable, postgres_schema_url
from modelfactory.testing.env import REPO
from modelfactory.testing.models import tiny_spec
from modelfactory.testing.prefect_server import (
    GpuHostWorkers,
    PrefectServer,
    child_env,
    kill_tree,
    prefect_api,
    started,
    wait_for,
)
from modelfactory.testing.s3_server import fresh_bucket

pytestmark = [pytest.mark.pool, pytest.mark.postgres]

#: Seconds without a heartbeat before Prefect's automation crashes a gpu-stage run (workers beat every 30 s).
ZOMBIE_AFTER_S = 60
#: The factory sides' run-key claims and liveness leases: short, so a killed side's rows are reconciled soon.
LEASE_S = "5"
SHARED = {"bits": 4, "group_size": 32}
SWEEPS = {"chaos-a": [SHARED, {"bits": 4, "group_size": 64}, {"bits": 8, "group_size": 32}],
          "chaos-b": [SHARED, {"bits": 4, "group_size": 64, "damp_percent": 0.05}, {"bits": 8, "group_size": 64}]}

FACTORY = textwrap.dedent("""
    import json, sys, time
    if sys.argv[3] == "stall-before-manifest":  # this side is SIGKILLed mid-publish: files up, manifest not yet
        from modelfactory.s3 import folders
        real_put = folders.put_if_absent
        def put(client, *, bucket, key, data):
            if key.endswith("/manifest.json"):
                print("PUBLISHING " + key, flush=True)
                time.sleep(3600)
            return real_put(client, bucket=bucket, key=key, data=data)
        folders.put_if_absent = put
    from modelfactory.interfaces.runner import run_sweep
    outcome = run_sweep(json.loads(sys.argv[1]), sweep_id=sys.argv[2])
    print("OUTCOME " + outcome.model_dump_json(), flush=True)
""")


@pytest.fixture(scope="module")
def store(moto_s3) -> Iterator[str]:
    with fresh_bucket(moto_s3, name="mf-chaos") as url:
        yield url


@pytest.fixture(scope="module")
def pg_catalog() -> Iterator[str]:
    """A fresh PostgreSQL schema: the catalog every factory side records into."""
    try:
        with postgres_schema_url() as url:
            open_catalog(url).dispose()  # the schema, migrated
            yield url
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[PrefectServer]:
    from modelfactory.interfaces.deploy import deploy

    with started(PrefectServer(tmp_path_factory.mktemp("prefect-server"))) as server, prefect_api(server):
        deploy(gpus=2, names=["gpu"], zombie_after_s=ZOMBIE_AFTER_S)
        yield server


def gpu_host(server: PrefectServer, root: Path, gpu: str, store: str) -> GpuHostWorkers:
    """One GPU host: its own home, work dir and stage cache; one worker (slot *gpu*)."""
    home = root / f"gpu-host-{gpu}"
    return GpuHostWorkers(server, home / "prefect", gpu_ids=gpu, MODELFACTORY_HOME=str(home),
                          MODELFACTORY_WORK_DIR=str(home / "work"), MODELFACTORY_STAGE_CACHE_DIR=str(home / "cache"),
                          MODELFACTORY_STAGE_STORE_URL=f"{store}/stage", MODELFACTORY_PREPARE_KERNELS="0")


def sweep_spec(tiny_llama: Path, name: str) -> dict:
    base = tiny_spec(tiny_llama)
    return {"name": name, "base": base["base"], "quantize": base["quantize"], "configs": SWEEPS[name],
            "benchmark": {"perplexity": {"context_len": 128, "stride": 128, "max_tokens": 512},
                          "decode": {"new_tokens": 4, "repeats": 1, "batch_sizes": [1]},
                          "runnability": {"enabled": False}},
            "gate": {"preset": "none", "max_ppl_increase_pct": 50.0}, "objective": "size",
            # Each side publishes under its own name: side b's winner is then never an artifact side a already
            # published (their winners can be the shared configuration), so b always reaches the publish it is
            # killed in.
            "publish": {"name": name}}


class FactorySide:
    """One factory host: a process with its own home running one sweep against the shared server, catalog
    and stores; its GPU steps go to the pool."""

    def __init__(self, root: Path, name: str, spec: dict, *, server: PrefectServer, store: str, catalog_url: str,
                 mode: str = "plain") -> None:
        self.home = root / f"{name}-{uuid.uuid4().hex[:6]}"
        self.home.mkdir(parents=True)
        self.sweep_id = str(uuid.uuid4())
        self.log = self.home / "factory.log"
        env = child_env(PYTHONPATH=str(REPO), PREFECT_API_URL=server.api_url, PREFECT_HOME=str(self.home / "prefect"),
                        MODELFACTORY_HOME=str(self.home), MODELFACTORY_CATALOG_URL=catalog_url,
                        MODELFACTORY_STAGE_STORE_URL=f"{store}/stage", MODELFACTORY_STORE_URL=f"{store}/published",
                        MODELFACTORY_GPU_DEPLOYMENT="gpu-stage/gpu", MODELFACTORY_GPU_POLL_S="1",
                        MODELFACTORY_CLAIM_LEASE_S=LEASE_S, MODELFACTORY_CLAIM_POLL_S="1")
        for unset in ("MODELFACTORY_WORK_DIR", "MODELFACTORY_STAGE_CACHE_DIR"):
            env.pop(unset, None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", FACTORY, json.dumps(spec), self.sweep_id, mode],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def finished(self, timeout: float) -> dict | None:
        """The sweep's outcome (``None`` when the sweep failed: its error is recorded in the catalog)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            raise AssertionError(f"{self.log} still running after {timeout:.0f} s:\n{self.text()[-6000:]}") from None
        lines = [line for line in self.text().splitlines() if line.startswith("OUTCOME ")]
        return json.loads(lines[-1].removeprefix("OUTCOME ")) if lines else None


def quantizing(workers: GpuHostWorkers) -> bool:
    """Whether a quantization process runs under this GPU host."""
    try:
        procs = psutil.Process(workers.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        try:
            if any("run_gptq" in arg for arg in proc.cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def store_objects(moto_s3, store: str, prefix: str) -> list[str]:
    bucket = store.removeprefix("s3://")
    pages = moto_s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_overlapping_sweeps_survive_a_killed_gpu_host_and_a_killed_factory_side(
        server, store, pg_catalog, moto_s3, tiny_llama, tmp_path):
    catalog_url = pg_catalog
    hosts = [gpu_host(server, tmp_path, gpu, store) for gpu in ("0", "1")]
    for host in hosts:
        host.start_and_wait()
    sides: list[FactorySide] = []
    try:
        a = FactorySide(tmp_path, "chaos-a", sweep_spec(tiny_llama, "chaos-a"), server=server, store=store,
                        catalog_url=catalog_url)
        b = FactorySide(tmp_path, "chaos-b", sweep_spec(tiny_llama, "chaos-b"), server=server, store=store,
                        catalog_url=catalog_url, mode="stall-before-manifest")
        sides += [a, b]

        def logs() -> str:
            return "\n".join([*(f"--- {s.log}\n{s.text()[-3000:]}" for s in sides), *(h.worker_logs(60) for h in hosts)])

        # Fault 1: a GPU host dies mid-quantize (the worker, its flow-run process, the quantization), then
        # comes back (an operator's restart); its member's gpu-stage run is crashed by Prefect's automation.
        victim = wait_for("a GPU host to be quantizing", lambda: next((h for h in hosts if quantizing(h)), None),
                          timeout=600, every=0.2, diagnostics=logs)
        victim.kill_hard()
        victim.start_and_wait()

        # Fault 2: factory side b dies mid-publish: its winner's files are up, its manifest is not.
        wait_for("factory side b to publish", lambda: "PUBLISHING " in b.text() or b.proc.poll() is not None,
                 timeout=1200, diagnostics=logs)
        assert b.proc.poll() is None, logs()
        kill_tree(b.proc.pid)
        first_a = a.finished(1200)

        # Whatever the dead factory side left running is closed once its leases lapse (nothing else runs now).
        catalog = open_catalog(catalog_url)
        closed: list = []
        with prefect_api(server):
            from modelfactory.interfaces.reconcile import flow_run_states

            def reconciled() -> bool:
                closed.extend(reconcile(catalog, flow_run_state=flow_run_states()))
                return not catalog.running_runs() and not catalog.running_sweeps()

            wait_for("the killed side's runs to be reconciled", reconciled, timeout=120, every=1)
        assert ("sweep", b.sweep_id) in {(c.kind, c.id) for c in closed}, closed
        assert all(c.kind == "sweep" or c.id not in {m["run_id"] for m in (first_a or {}).get("members", [])}
                   for c in closed)  # sweep a's side was alive: none of its runs was touched

        # Rerun whatever failed: sweep b, and sweep a if a member of it was on the killed host.
        reruns = [FactorySide(tmp_path, "chaos-b", sweep_spec(tiny_llama, "chaos-b"), server=server, store=store,
                              catalog_url=catalog_url)]
        a_failed = first_a is None or any(m["status"] == "failed" for m in first_a["members"])
        if a_failed:
            reruns.append(FactorySide(tmp_path, "chaos-a", sweep_spec(tiny_llama, "chaos-a"), server=server,
                                      store=store, catalog_url=catalog_url))
        sides += reruns
        outcomes = [side.finished(1200) for side in reruns]
        assert all(o is not None and o["winner_run_id"] for o in outcomes), logs()
        assert all(m["status"] == "passed" for o in outcomes for m in o["members"]), outcomes

        # 1. No run and no sweep is left running.
        assert catalog.running_runs() == [] and catalog.running_sweeps() == []

        # 2. Every published manifest's hashes are those of the weights its run's benchmark loaded.
        published = 0
        for sweep in catalog.list_sweeps(limit=100):
            for member in catalog.get_sweep(sweep.id).members:
                run = catalog.get_run(member.run_id)
                for publication in run.publications:
                    manifest = verify_artifact(uri=publication.uri)  # every file's sha256 checked
                    measured = {s.name: s for s in run.steps}["benchmark"].detail["gptq_sha256"]
                    assert content_digest(manifest["files"]) == manifest["content_sha256"] == measured
                    assert publication.content_sha256 == measured
                    published += 1
        assert published >= 2  # both sweeps' winners

        # 3. Each step key has exactly one output in the store: one marker, the files of one attempt.
        by_key: dict[str, set[str]] = defaultdict(set)
        for key in store_objects(moto_s3, store, "stage/"):
            parts = key.removeprefix("stage/").split("/")
            if parts[0] != "gpu-stage":
                by_key["/".join(parts[:2])].add(parts[2])  # the marker, or an attempt prefix
        assert by_key, "nothing in the stage store"
        for output, entries in by_key.items():
            assert "_COMPLETE.json" in entries, f"{output}: files without a marker"
            assert len(entries - {"_COMPLETE.json"}) == 1, f"{output} holds several attempts: {sorted(entries)}"

        # 4. Every failure has a clear, recorded reason.
        failed = [r for r in catalog.list_runs(limit=1000) if r.status == "failed"]
        assert failed, "the faults left no failed run"
        for row in failed:
            run = catalog.get_run(row.id)
            assert run.error and run.error_kind in ("gpu_stage", "crashed", "sweep_aborted"), (run.error_kind, run.error)
            assert "crash" in run.error.lower() or "sweep failed" in run.error, run.error
        for sweep in catalog.list_sweeps(status="failed"):
            assert sweep.error and "crash" in sweep.error.lower(), sweep.error
        catalog.dispose()
    finally:
        for side in sides:
            kill_tree(side.proc.pid)
        for host in hosts:
            host.stop()
