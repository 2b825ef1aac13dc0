"""The catalog goes away at the start or at the end of a run, for real: a TCP proxy in front of
PostgreSQL that drops every connection the moment it sees a chosen SQL statement (and refuses new
ones until restored). Afterwards nothing is lost and nothing is recorded twice: the published
artifact's manifest re-records the run (``modelfactory catalog import``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.engine import make_url

from modelfactory.catalog import open_catalog
from modelfactory.catalog.recovery import import_artifact, local_artifact_uris
from modelfactory.core.errors import CatalogError
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.catalog import postgres_schema_url
from modelfactory.testing.env import own_work_dir, settings_env
from modelfactory.testing.models import TINY_GATE, tiny_spec

pytestmark = pytest.mark.postgres


class CuttingProxy:
    """Forwards 127.0.0.1:port → PostgreSQL; ``cut_on`` bytes in a client packet take the database "down"."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut_on: bytes | None = None
        self.down = threading.Event()
        self.cut_seen = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.cut_on and self.cut_on in data:
                    self.cut_seen.set()
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self) -> None:
        """The database is gone: every open connection dropped, new ones refused."""
        self.down.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.cut_on = None
        self.down.clear()

    def close(self) -> None:
        self._server.close()
        self.cut()


@contextmanager
def catalog_behind_proxy() -> Iterator[tuple[CuttingProxy, str, str]]:
    """(proxy, url through the proxy, direct url) of a fresh PostgreSQL schema, set as the catalog."""
    with postgres_schema_url() as direct:
        url = make_url(direct)
        proxy = CuttingProxy((url.host or "127.0.0.1", url.port or 5432))
        proxied = url.set(port=proxy.port).update_query_dict({"sslmode": "disable"}).render_as_string(
            hide_password=False)
        open_catalog(direct).dispose()  # create the schema
        try:
            with settings_env(MODELFACTORY_CATALOG_URL=proxied):
                yield proxy, proxied, direct
        finally:
            proxy.close()


def test_catalog_down_at_the_start_fails_clearly_before_any_work(prefect, tiny_llama, tmp_path):
    with catalog_behind_proxy() as (proxy, _proxied, direct), own_work_dir(tmp_path / "work") as work:
        proxy.cut()
        with pytest.raises(CatalogError, match="cannot connect to the catalog") as info:
            run_factory(tiny_spec(tiny_llama, name="db-down-start", gate=TINY_GATE))
        assert "is the database running?" in str(info.value)
        assert not any(work.rglob("_COMPLETE.json")), "steps ran without a catalog"
        proxy.restore()
        assert open_catalog(direct).list_runs() == []


def test_catalog_down_at_the_end_then_the_manifest_re_records_the_run_once(prefect, tiny_llama, tmp_path):
    store = tmp_path / "store"
    spec = tiny_spec(tiny_llama, name="db-down-end", gate=TINY_GATE, publish={"destination": store.as_uri()})
    # The first run cannot release its run-key claim (the database is down by then), so the rerun below
    # waits for the claim's lease to expire: 60 s by default, 5 s here.
    with settings_env(MODELFACTORY_CLAIM_LEASE_S="5", MODELFACTORY_CLAIM_POLL_S="0.5"), \
            catalog_behind_proxy() as (proxy, _proxied, direct):
        proxy.cut_on = b"INSERT INTO publications"  # the model is published; recording it fails
        with pytest.raises(CatalogError):
            run_factory(spec)
        assert proxy.cut_seen.is_set()
        (uri,) = local_artifact_uris(store)  # published: complete, manifest written last
        proxy.restore()

        catalog = open_catalog(direct)
        (stale,) = catalog.list_runs()
        assert stale.status == "running", "the run could not be closed while the database was down"
        assert not catalog.get_run(stale.id).publications

        first = import_artifact(catalog, uri=uri)
        assert (first.action, first.run_id) == ("completed", stale.id)
        again = import_artifact(catalog, uri=uri)
        assert (again.action, again.run_id) == ("already-recorded", stale.id)

        (run,) = catalog.list_runs()
        detail = catalog.get_run(run.id)
        assert detail.status == "passed" and detail.gate_passed
        assert [a.uri for a in detail.artifacts] == [uri] and len(detail.publications) == 1  # nothing twice
        assert detail.value("perplexity", "gptq") and detail.value("ppl_increase_pct", "delta") is not None
        assert [s.name for s in detail.steps][:3] == ["download", "merge", "quantize"]

        # A rerun once the database is back: every step reused, the same artifact, a second run row.
        outcome = run_factory(spec)
        assert outcome.status == "passed" and outcome.artifact_uri == uri
        assert len(catalog.list_runs()) == 2


def test_import_into_an_empty_catalog_creates_the_run(prefect, tiny_llama, tmp_path):
    store = tmp_path / "store"
    spec = tiny_spec(tiny_llama, name="import-fresh", gate=TINY_GATE, publish={"destination": store.as_uri()})
    outcome = run_factory(spec)
    with open_catalog(f"sqlite:///{tmp_path / 'fresh' / 'catalog.db'}") as fresh:
        created = import_artifact(fresh, uri=outcome.artifact_uri)
        assert created.action == "created"
        detail = fresh.get_run(created.run_id)
        assert detail.status == "passed" and detail.spec["name"] == "import-fresh"
        assert detail.base_sha and detail.adapters == []
        assert import_artifact(fresh, uri=outcome.artifact_uri).action == "already-recorded"


def test_import_refuses_an_artifact_whose_files_are_not_the_ones_its_run_benchmarked(tmp_path):
    """Read-back (issue 24.3): completing a run from a manifest checks that the artifact's files are the ones
    that run benchmarked (its benchmark step's gptq_sha256); other files are not recorded as its artifact."""
    from modelfactory.core.manifest import build_manifest, content_digest
    from modelfactory.core.errors import PublishError
    from modelfactory.publishing.local import publish_local

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\1" * 64)
    fields = {"spec": {"name": "other-bytes"}, "run_key": "k-other-bytes", "gate": {"passed": True, "checks": []},
              "sources": {"base": {"uri": "org/base", "sha": "a" * 40}, "adapters": []},
              "metrics": {"measured": [{"name": "size_ratio", "side": "delta", "value": 0.5}]}}
    key = content_digest(build_manifest(model)["files"])
    folder, _, _ = publish_local(source=model, root=tmp_path / "store", parts=("m", "gptq-4bit-32g", key),
                                 manifest=build_manifest(model, key=key, **fields))
    with open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}") as catalog:
        catalog.start_run(run_id="r-other-bytes", name="other-bytes", spec={}, run_key="k-other-bytes")
        catalog.record_step(run_id="r-other-bytes", name="benchmark", status="ok", duration_s=1.0,
                            detail={"gptq_sha256": "f" * 64})
        with pytest.raises(PublishError, match="are not the ones run r-other-bytes benchmarked"):
            import_artifact(catalog, uri=folder.as_uri())
        detail = catalog.get_run("r-other-bytes")
        assert detail.status == "running" and not detail.artifacts and not detail.publications


# --------------------------------------------------------------------------- crashed flows (issue 24.5)

KILLED_RUN = """
import sys, time
from modelfactory.tasks.record import RunRecorder
recorder = RunRecorder.start(run_id=sys.argv[1], name="killed", spec={}, run_key="k-killed", flow_run_id=sys.argv[2],
                             catalog_url=sys.argv[3])
recorder.step("download", duration_s=0.1)
print("running", flush=True)
time.sleep(600)
"""


def test_reconcile_closes_a_run_whose_process_was_killed_and_leaves_live_ones_alone(tmp_path):
    """A flow process SIGKILLed mid-run left its catalog row ``running`` forever; no hook runs on SIGKILL.
    ``catalog reconcile`` closes it once its liveness lease expired (its flow run unknown to Prefect here)."""
    import os
    import subprocess
    import sys
    import time

    from modelfactory.catalog import claims
    from modelfactory.catalog.recovery import reconcile
    from modelfactory.testing.env import REPO

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = open_catalog(url)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, "r-killed", "fr-killed", url], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "MODELFACTORY_CLAIM_LEASE_S": "1"})
    try:
        assert proc.stdout.readline().strip() == "running"
        catalog.start_run(run_id="r-alive", name="alive", spec={}, run_key="k-alive", flow_run_id="fr-alive")
        end_alive = claims.keep_alive(catalog, claims.alive_key("run", "r-alive"), holder="this test")
        assert reconcile(catalog) == []  # both alive: nothing closed
        proc.kill()
        proc.wait(30)
        closed = []
        for _ in range(100):  # the killed one's lease (1 s) runs out
            closed = reconcile(catalog)
            if closed:
                break
            time.sleep(0.1)
        assert [(c.kind, c.id) for c in closed] == [("run", "r-killed")]
        killed = catalog.get_run("r-killed")
        assert (killed.status, killed.error_kind) == ("failed", "crashed")
        assert "stopped renewing its liveness lease" in killed.error and "Run it again" in killed.error
        assert catalog.get_run("r-alive").status == "running"
        end_alive()
    finally:
        proc.kill()
        catalog.dispose()


def test_reconcile_closes_runs_and_sweeps_whose_flow_run_prefect_reports_crashed(tmp_path):
    from modelfactory.catalog import claims
    from modelfactory.catalog.recovery import reconcile

    with open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}") as catalog:
        catalog.start_run(run_id="r-crashed", name="c", spec={}, run_key="k1", flow_run_id="fr-crashed")
        catalog.start_run(run_id="r-running", name="r", spec={}, run_key="k2", flow_run_id="fr-running")
        catalog.start_sweep(sweep_id="s-gone", name="s", spec={}, objective="quality", publish_mode="winner",
                            flow_run_id="fr-gone")
        ends = [claims.keep_alive(catalog, claims.alive_key("run", r), holder="t") for r in ("r-crashed", "r-running")]
        states = {"fr-crashed": "CRASHED", "fr-running": "RUNNING"}
        closed = reconcile(catalog, flow_run_state=states.get)
        assert sorted((c.kind, c.id) for c in closed) == [("run", "r-crashed"), ("sweep", "s-gone")]
        assert "ended CRASHED" in catalog.get_run("r-crashed").error
        assert catalog.get_run("r-running").status == "running"
        swept = catalog.get_sweep("s-gone")
        assert swept.status == "failed" and swept.error_kind == "crashed" and "not on the Prefect server" in swept.error
        catalog.start_run(run_id="r-stuck", name="s", spec={}, run_key="k3", flow_run_id="fr-running")  # no lease
        (stuck,) = reconcile(catalog, flow_run_state=states.get)  # Prefect still says RUNNING: the lease decides
        assert stuck.id == "r-stuck" and "still shows RUNNING" in stuck.reason
        assert reconcile(catalog, flow_run_state=states.get) == []  # safe to repeat
        for end in ends:
            end()


def test_catalog_reconcile_command_and_serve_start_close_dead_runs(tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from modelfactory.interfaces.cli.main import app
    from modelfactory.interfaces.server import create_app
    from modelfactory.testing.server import catalog_app_env

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with open_catalog(url) as catalog, settings_env(MODELFACTORY_CATALOG_URL=url, PREFECT_API_URL=None):
        catalog.start_run(run_id="r-dead-cli", name="d", spec={}, run_key="k1")
        result = CliRunner().invoke(app, ["catalog", "reconcile"])
        assert result.exit_code == 0, result.output
        assert "crashed: run r-dead-cli" in result.output
        assert catalog.get_run("r-dead-cli").status == "failed"

        catalog.start_run(run_id="r-dead-serve", name="d", spec={}, run_key="k2")
        with catalog_app_env(url), TestClient(create_app()) as client:
            assert client.get("/healthz").status_code == 200
        assert catalog.get_run("r-dead-serve").error_kind == "crashed"


def test_the_crash_hook_closes_the_runs_and_sweeps_of_its_flow_run(tmp_path):
    from types import SimpleNamespace

    from modelfactory.tasks.record import record_crash

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with open_catalog(url) as catalog, settings_env(MODELFACTORY_CATALOG_URL=url):
        catalog.start_run(run_id="r-hooked", name="h", spec={}, run_key="k1", flow_run_id="fr-1")
        catalog.start_run(run_id="r-other", name="o", spec={}, run_key="k2", flow_run_id="fr-2")
        catalog.start_sweep(sweep_id="s-hooked", name="s", spec={}, objective="quality", publish_mode="winner",
                            flow_run_id="fr-1")
        record_crash(None, SimpleNamespace(id="fr-1"), SimpleNamespace(name="Crashed", message="SIGTERM"))
        hooked = catalog.get_run("r-hooked")
        assert (hooked.status, hooked.error_kind) == ("failed", "crashed") and "SIGTERM" in hooked.error
        assert catalog.get_sweep("s-hooked").status == "failed"
        assert catalog.get_run("r-other").status == "running"


def test_a_run_id_can_be_started_again_once_its_earlier_attempt_failed_or_died(tmp_path):
    """An on-finetune run could not be retried: its run id is its flow run id, and start_run refused it."""
    from modelfactory.core.errors import CatalogQueryError
    from modelfactory.tasks.record import RunRecorder

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    first = RunRecorder.start(run_id="r-retry", name="x", spec={}, run_key="k", flow_run_id="fr-1", catalog_url=url)
    with pytest.raises(CatalogQueryError, match="already exists"):  # the first attempt is alive
        RunRecorder.start(run_id="r-retry", name="x", spec={}, run_key="k", flow_run_id="fr-1", catalog_url=url)
    first.fail(RuntimeError("attempt 1 failed"))
    second = RunRecorder.start(run_id="r-retry", name="x", spec={}, run_key="k", flow_run_id="fr-1", catalog_url=url)
    assert second.catalog.get_run("r-retry").status == "running" and second.catalog.get_run("r-retry").error is None
    second.finish("passed")
    with pytest.raises(CatalogQueryError):  # a finished run is not started again
        RunRecorder.start(run_id="r-retry", name="x", spec={}, run_key="k", flow_run_id="fr-1", catalog_url=url)


def test_a_sweep_id_can_be_started_again_once_its_earlier_attempt_failed_or_died(tmp_path):
    """A sweep built by an on-finetune run has that flow run's id: a retry of it came back with an id that
    start_sweep refused ('already exists'). prepare_sweep_retry mirrors RunRecorder.start for sweeps."""
    from modelfactory.catalog import claims
    from modelfactory.core.errors import CatalogQueryError
    from modelfactory.tasks.record import prepare_sweep_retry

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = open_catalog(url)

    def start(sweep_id: str) -> None:
        catalog.start_sweep(sweep_id=sweep_id, name="s", spec={}, objective="speed", publish_mode="winner",
                            flow_run_id="fr-1")

    prepare_sweep_retry(sweep_id="s-new", catalog_url=url)  # not in the catalog: nothing to do
    start("s-retry")
    end_lease = claims.keep_alive(catalog, claims.alive_key("sweep", "s-retry"), holder="attempt-1")
    catalog.start_run(run_id="r-member", name="m", spec={}, run_key="k")
    catalog.add_member(sweep_id="s-retry", run_id="r-member", label="gptq-4bit-64g", kernel="auto")
    prepare_sweep_retry(sweep_id="s-retry", catalog_url=url)  # the first attempt is alive: left alone
    with pytest.raises(CatalogQueryError, match="already exists"):
        start("s-retry")
    catalog.fail_sweep(sweep_id="s-retry", error="attempt 1 failed")
    end_lease()
    prepare_sweep_retry(sweep_id="s-retry", catalog_url=url)
    start("s-retry")  # the retry records the sweep afresh; the earlier member's run stays, unlinked
    again = catalog.get_sweep("s-retry")
    assert again.status == "running" and again.error is None and again.members == ()
    assert catalog.get_run("r-member").id == "r-member"
    catalog.add_member(sweep_id="s-retry", run_id="r-member", label="gptq-4bit-64g", kernel="auto")  # label free

    start("s-dead")  # running, but its process is gone (no liveness lease): it died
    prepare_sweep_retry(sweep_id="s-dead", catalog_url=url)
    start("s-dead")

    catalog.finish_sweep(sweep_id="s-retry", winner_run_id=None, front=[])
    prepare_sweep_retry(sweep_id="s-retry", catalog_url=url)  # a finished sweep is kept, and not started again
    assert catalog.get_sweep("s-retry").status == "finished"
    with pytest.raises(CatalogQueryError, match="already exists"):
        start("s-retry")
    with pytest.raises(CatalogQueryError, match="finished"):
        catalog.discard_sweep(sweep_id="s-retry")


def test_each_attempt_of_a_run_dispatches_its_own_gpu_stage(prefect):
    """The gpu-stage idempotency key was the run id alone: a retried run got its old, crashed stage back."""
    from prefect import flow

    from modelfactory.gpu_pool.dispatch import stage_key

    @flow
    def attempt() -> tuple[str, str]:
        return stage_key("r-1"), stage_key("r-1")

    first, again = attempt()
    assert first == again  # one attempt: one stage
    assert attempt()[0] != first  # another attempt (a new flow run): another stage
