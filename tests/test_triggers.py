"""Triggers, for real: `prefect server` (with its UI), the deployments of `deployments/prefect.yaml`
applied by `modelfactory.interfaces.deploy`, a process worker on the `cpu` pool, `modelfactory serve` (the
webhook), and a loopback stand-in for the Hugging Face Hub (the endpoints `HfApi.model_info` and
`snapshot_download` use), reached through HF_ENDPOINT by the worker's flow runs.

Checked: every deployment and the nightly schedule exist; the factory's UI form (headless Chromium,
screenshot in test-artifacts/); a custom-parameter run (what the UI's "Custom run" sends) completes
with those parameters; the nightly check does nothing when nothing changed and builds a new commit;
webhook → on-finetune run → catalog row; a watch whose spec sweeps: webhook → on-finetune run → sweep
(under the same id) → winner published; bad requests are refused without a run; a repeated delivery and
a burst of 50 deliveries for 5 commits start one run per commit.

Budget: ~4 min on 2 cores before the sweep test was added (three tiny factory builds, three nightly
runs); it adds one tiny sweep of two configurations. The whole module took 9 min on 2026-12-07 on a
2-core machine shared with other test runs (load average ~5).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import pytest
from typer.testing import CliRunner

from modelfactory.catalog import open_catalog
from modelfactory.testing.browser import open_browser, screenshot_path
from modelfactory.testing.models import make_lora, tiny_spec
from modelfactory.testing.prefect_server import (
    BIN,
    REPO,
    Background,
    PrefectServer,
    api,
    child_env,
    free_port,
    prefect_api,
    started,
    wait_for,
)

pytestmark = pytest.mark.pool

SECRET = "s3cr3t-for-tests"
ADAPTER_REPO = "mf-test/tiny-lora"
BURST_REPO = "mf-test/burst-lora"
SWEEP_REPO = "mf-test/sweep-lora"
#: Watch spec fields: the tiny model's cheap calibration/benchmark and a gate it passes.
CHEAP = {k: v for k, v in tiny_spec(Path("/unused")).items() if k in ("quantize", "benchmark")} | {
    "gate": {"preset": "none", "max_ppl_increase_pct": 50.0}}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --------------------------------------------------------------------------- a loopback Hub
class FakeHub:
    """Model repos with commits (folders) and branches, served like the Hub's API to huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, head=True)

            def do_GET(self) -> None:
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def push(self, repo: str, folder: Path, branch: str = "main") -> str:
        """A new commit of *repo* holding the files of *folder*; moves *branch* to it."""
        entry = self.repos.setdefault(repo, {"branches": {}, "commits": {}})
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        parent = entry["branches"].get(branch, "")
        sha = hashlib.sha1(parent.encode() + b"".join(n.encode() + d for n, d in files.items())).hexdigest()
        entry["commits"][sha], entry["branches"][branch] = files, sha
        return sha

    def _commit(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        entry = self.repos.get(repo)
        if entry is None:
            return None
        sha = entry["branches"].get(rev, rev)
        return (sha, entry["commits"][sha]) if sha in entry["commits"] else None

    def answer(self, handler: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        body, headers, status = b"", {}, 404
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, rev = "/".join(parts[2:4]), parts[5]
            if found := self._commit(repo, rev):
                sha, files = found
                if parts[4] == "revision":
                    data: Any = {"id": repo, "modelId": repo, "sha": sha, "private": False,
                                 "siblings": [{"rfilename": name} for name in files]}
                else:
                    data = [{"type": "file", "path": name, "size": len(blob),
                             "oid": hashlib.sha1(blob).hexdigest()} for name, blob in files.items()]
                body, status = json.dumps(data).encode(), 200
                headers["Content-Type"] = "application/json"
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if (found := self._commit(repo, rev)) and name in found[1]:
                body, status = found[1][name], 200
                headers.update({"X-Repo-Commit": found[0], "ETag": f'"{hashlib.sha256(body).hexdigest()}"'})
        if status == 404:
            body, headers["X-Error-Code"] = b'{"error":"not found"}', "RepoNotFound"
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def hub_env(hub, tmp_path_factory) -> dict[str, str]:
    """What the worker's flow runs need to reach the Hub stand-in (conftest makes this process offline)."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def server(factory_home, tmp_path_factory) -> Iterator[PrefectServer]:
    with started(PrefectServer(tmp_path_factory.mktemp("prefect-server"), ui=True)) as server:
        yield server


@pytest.fixture(scope="module")
def deployed(server) -> Iterator[PrefectServer]:
    """Everything `modelfactory deploy` sets up; this process's Prefect calls go to the server."""
    from modelfactory.interfaces.deploy import deploy

    with prefect_api(server):
        begun = time.perf_counter()
        deploy()
        print(f"deploy: {time.perf_counter() - begun:.1f} s")
        yield server


@pytest.fixture(scope="module")
def worker(deployed, hub_env, tmp_path_factory) -> Iterator[Background]:
    """One process worker on the `cpu` pool, as an operator starts it (flow runs inherit its env)."""
    home = tmp_path_factory.mktemp("cpu-worker")
    worker = Background("cpu-worker", [str(BIN / "prefect"), "--no-prompt", "worker", "start", "--pool", "cpu",
                                       "--type", "process", "--limit", "2", "--name", "cpu-test"],
                        env=child_env(PREFECT_API_URL=deployed.api_url, PREFECT_HOME=str(home),
                                      MODELFACTORY_SOURCE_DIR=str(REPO), PREFECT_WORKER_QUERY_SECONDS="1",
                                      PREFECT_WORKER_PREFETCH_SECONDS="1", **hub_env),
                        log=home / "worker.log")
    worker.start()
    try:
        wait_for("the cpu worker online", lambda: any(
            w["status"] == "ONLINE" for w in api(deployed, "POST", "/work_pools/cpu/workers/filter")),
            timeout=90, diagnostics=worker.tail)
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def hooks(deployed, tmp_path_factory) -> Iterator[str]:
    """`modelfactory serve` on a free port with the webhook secret; its base URL."""
    port, home = free_port(), tmp_path_factory.mktemp("serve")
    serve = Background("modelfactory-serve", [str(BIN / "modelfactory"), "serve", "--port", str(port)],
                       env=child_env(PREFECT_API_URL=deployed.api_url, PREFECT_HOME=str(home),
                                     MODELFACTORY_WEBHOOK_SECRET=SECRET), log=home / "serve.log")
    serve.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("modelfactory serve", lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
                 timeout=60, diagnostics=serve.tail)
        yield url
        assert "Traceback" not in serve.log.read_text(), serve.tail(80)
        survivors = sigterm_alone(serve)
        assert not survivors, f"outlived `modelfactory serve`: {survivors}"
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> list[Path]:
    """Three versions of a LoRA adapter for the tiny model (pushed as successive commits)."""
    return [make_lora(tiny_llama, tmp_path_factory.mktemp(f"lora-v{seed}"), seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def adapter_watched(hub, adapters, tiny_llama, tmp_path_factory) -> str:
    """ADAPTER_REPO on the watch list with its first version (v1, its sha returned) already built."""
    v1 = hub.push(ADAPTER_REPO, adapters[0])
    watch_add(ADAPTER_REPO, "--base", str(tiny_llama), "--spec",
              str(cheap_spec_file(tmp_path_factory.mktemp("watch-spec"))))
    open_catalog().set_watch_sha(ADAPTER_REPO, v1)  # v1 was built before
    return v1


# --------------------------------------------------------------------------- helpers
def deployment(server: PrefectServer, name: str) -> dict[str, Any]:
    return api(server, "GET", f"/deployments/name/{name}")


def runs_of(server: PrefectServer, name: str) -> list[dict[str, Any]]:
    dep = deployment(server, name)
    return api(server, "POST", "/flow_runs/filter", flow_runs={"deployment_id": {"any_": [dep["id"]]}})


def wait_final(server: PrefectServer, flow_run_id: str, worker: Background, timeout: float = 420) -> dict:
    def final() -> dict | None:
        run = api(server, "GET", f"/flow_runs/{flow_run_id}")
        return run if run["state"]["type"] in FINAL else None

    run = wait_for(f"flow run {flow_run_id} to finish", final, timeout=timeout, every=1, diagnostics=worker.tail)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{worker.tail(120)}"
    return run


def run_deployment_and_wait(server: PrefectServer, name: str, parameters: dict, worker: Background) -> dict:
    """What the UI's "Custom run" does: POST /deployments/{id}/create_flow_run with the form's parameters."""
    dep = deployment(server, name)
    run = api(server, "POST", f"/deployments/{dep['id']}/create_flow_run", parameters=parameters,
              state={"type": "SCHEDULED"})
    return wait_final(server, run["id"], worker)


def content_update(repo: str, sha: str, *, ref: str = "refs/heads/main", scope: str = "repo.content",
                   repo_type: str = "model") -> dict[str, Any]:
    """A Hub webhook payload for a push (https://huggingface.co/docs/hub/webhooks)."""
    return {"event": {"action": "update", "scope": scope},
            "repo": {"type": repo_type, "name": repo, "id": "6366c000a2abcdf2fd69a080", "private": False,
                     "url": {"web": f"https://huggingface.co/{repo}", "api": f"https://huggingface.co/api/models/{repo}"},
                     "headSha": sha, "owner": {"id": "61d2000c3c2083e1c08af22d"}},
            "updatedRefs": [{"ref": ref, "oldSha": None, "newSha": sha}],
            "webhook": {"id": "6390e855e30d9209411de93b", "version": 3}}


def deliver(url: str, payload: Any, *, secret: str | None = SECRET, raw: bytes | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"X-Webhook-Secret": secret} if secret is not None else {})
    return httpx.post(f"{url}/hooks/huggingface", content=raw if raw is not None else json.dumps(payload),
                      headers=headers, timeout=30)


def sigterm_alone(proc: Background) -> list[list[str]]:
    """SIGTERM to *proc*'s own pid (as `kill PID` or a supervisor sends it); the command lines of
    descendants that outlived it (killed after being noted)."""
    import os
    import signal

    import psutil

    descendants = psutil.Process(proc.proc.pid).children(recursive=True)
    os.kill(proc.proc.pid, signal.SIGTERM)
    proc.proc.wait(timeout=60)
    _gone, alive = psutil.wait_procs(descendants, timeout=10)
    survivors = []
    for survivor in alive:
        survivors.append(survivor.cmdline())
        survivor.kill()
    return survivors


def watch_add(repo: str, *args: str) -> None:
    from modelfactory.interfaces.cli.main import app

    result = CliRunner().invoke(app, ["watch", "add", repo, *args])
    assert result.exit_code == 0, result.output


def cheap_spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "watch-spec.json"
    path.write_text(json.dumps(CHEAP))
    return path


# --------------------------------------------------------------------------- deployments, schedule, UI
def test_deploy_registers_every_deployment_and_the_nightly_schedule(deployed):
    for name in ("model-factory/factory", "sweep/sweep", "watch-nightly/nightly", "on-finetune/on-finetune",
                 "gpu-stage/gpu"):
        assert deployment(deployed, name)["name"] == name.split("/")[1]
    assert {p["name"] for p in api(deployed, "POST", "/work_pools/filter")} >= {"cpu", "gpu"}
    for name in ("model-factory/factory", "sweep/sweep", "watch-nightly/nightly", "on-finetune/on-finetune"):
        assert deployment(deployed, name)["work_pool_name"] == "cpu"

    nightly = deployment(deployed, "watch-nightly/nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] is True

    # The factory's form is the FactorySpec model: typed fields with defaults and descriptions.
    schema = deployment(deployed, "model-factory/factory")["parameter_openapi_schema"]
    assert schema["required"] == ["spec"]
    quant = schema["definitions"]["QuantSpec"]["properties"]
    assert quant["bits"]["enum"] == [2, 3, 4, 8] and quant["bits"]["default"] == 4
    assert quant["group_size"]["default"] == "auto" and "scale group" in quant["group_size"]["description"]
    assert "max_ppl_increase_pct" in schema["definitions"]["GateSpec"]["properties"]
    on_finetune = deployment(deployed, "on-finetune/on-finetune")["parameter_openapi_schema"]
    assert on_finetune["properties"]["sha"]["pattern"] == "^[0-9a-f]{40}$"


def test_the_scheduler_creates_the_nightly_runs(deployed):
    dep = deployment(deployed, "watch-nightly/nightly")
    wait_for("scheduled nightly runs", lambda: api(deployed, "POST", "/flow_runs/filter", flow_runs={
        "deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}), timeout=15, every=2)


def test_prefect_ui_shows_the_factory_run_form(deployed):
    dep = deployment(deployed, "model-factory/factory")
    base = deployed.api_url.removesuffix("/api")
    with open_browser() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.goto(f"{base}/deployments/deployment/{dep['id']}", wait_until="networkidle")
        page.get_by_role("button", name="Run", exact=True).click()  # the deployment page's Run menu
        page.get_by_text("Custom run").first.click()
        page.wait_for_url(f"**/deployments/deployment/{dep['id']}/run**", timeout=30_000)
        page.get_by_text("Group Size").first.wait_for(timeout=30_000)
        page.screenshot(path=str(screenshot_path("prefect-ui-factory-custom-run.png")), full_page=True)
        text = page.inner_text("body")
    for label in ("Bits", "Group Size", "Damp Percent", "Max Ppl Increase Pct", "Uri"):
        assert label in text, f"{label!r} not on the Custom run form:\n{text[:3000]}"


def test_custom_parameters_run_completes_with_them(worker, deployed, tiny_llama):
    spec = tiny_spec(tiny_llama, name="ui-custom", quantize={
        "bits": 4, "group_size": 64, "calibration": {"num_samples": 6, "seq_len": 64}},
        gate={"max_ppl_increase_pct": 50.0})
    run = run_deployment_and_wait(deployed, "model-factory/factory", {"spec": spec}, worker)
    (row,) = [r for r in open_catalog().list_runs(limit=20) if r.name == "ui-custom"]
    detail = open_catalog().get_run(row.id)
    assert detail.status == "passed", detail.error
    assert detail.spec["quantize"]["group_size"] == 64 and detail.spec["quantize"]["calibration"]["num_samples"] == 6
    assert run["parameters"]["spec"]["quantize"]["group_size"] == 64


# --------------------------------------------------------------------------- nightly
def test_nightly_does_nothing_when_nothing_changed_and_builds_a_new_commit(worker, deployed, hub, adapters,
                                                                          adapter_watched):
    run_deployment_and_wait(deployed, "watch-nightly/nightly", {}, worker)
    assert runs_of(deployed, "on-finetune/on-finetune") == []  # nothing changed: nothing ran
    assert any(r == f"GET /api/models/{ADAPTER_REPO}/revision/main" for r in hub.requests)  # it did look

    v2 = hub.push(ADAPTER_REPO, adapters[1])
    nightly = run_deployment_and_wait(deployed, "watch-nightly/nightly", {}, worker)
    (build,) = runs_of(deployed, "on-finetune/on-finetune")
    assert build["parameters"] == {"repo": ADAPTER_REPO, "sha": v2, "event": "nightly"}
    assert build["parent_task_run_id"] is not None  # a subflow of the nightly run in the UI
    wait_final(deployed, build["id"], worker)
    detail = open_catalog().get_run(build["id"])  # catalog run id = the on-finetune flow run id
    assert detail.status == "passed", detail.error
    assert [(a["uri"], a["sha"]) for a in detail.adapters] == [(f"hf://{ADAPTER_REPO}", v2)], detail.adapters
    assert open_catalog().get_watch(ADAPTER_REPO).last_sha == v2
    assert nightly["state"]["type"] == "COMPLETED"

    run_deployment_and_wait(deployed, "watch-nightly/nightly", {}, worker)  # built already: nothing new
    assert len(runs_of(deployed, "on-finetune/on-finetune")) == 1


# --------------------------------------------------------------------------- webhook
def test_webhook_push_starts_a_build_once(hooks, worker, deployed, hub, adapters, adapter_watched):
    v3 = hub.push(ADAPTER_REPO, adapters[2])
    answer = deliver(hooks, content_update(ADAPTER_REPO, v3))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "accepted" and body["sha"] == v3
    flow_run_id = body["flow_run_id"]

    again = deliver(hooks, content_update(ADAPTER_REPO, v3))  # the Hub retrying, or a replay
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert again.json()["flow_run_id"] == flow_run_id

    run = wait_final(deployed, flow_run_id, worker)
    assert run["parameters"] == {"repo": ADAPTER_REPO, "sha": v3, "event": "webhook"}
    detail = open_catalog().get_run(flow_run_id)
    assert detail.status == "passed", detail.error
    assert [a["sha"] for a in detail.adapters] == [v3]
    builds = [r for r in runs_of(deployed, "on-finetune/on-finetune") if r["parameters"]["sha"] == v3]
    assert [r["id"] for r in builds] == [flow_run_id]
    (delivery,) = [d for d in open_catalog().list_deliveries(repo=ADAPTER_REPO) if d.sha == v3]
    assert delivery.status == "started" and delivery.flow_run_id == flow_run_id and delivery.event == "webhook"


def test_webhook_push_for_a_sweep_watch_builds_a_sweep_and_publishes_its_winner(hooks, worker, deployed, hub,
                                                                                  adapters, tiny_llama, tmp_path):
    """Issue 26: a watched fine-tune whose watch spec sweeps (here 2 configurations of the tiny model, a grid
    over the group size): the webhook's flow run id is the sweep's catalog id; the sweep finishes, every
    configuration built from the pushed commit, and the winner by the objective (size) is published."""
    from modelfactory.core.manifest import verify_folder
    from modelfactory.interfaces.cli.main import app
    from modelfactory.publishing.local import local_root

    spec = tmp_path / "watch-sweep.json"
    spec.write_text(json.dumps({**CHEAP, "grid": {"group_size": [64, 32]}, "objective": "size"}))
    watch_add(SWEEP_REPO, "--base", str(tiny_llama), "--spec", str(spec))
    listed = json.loads(CliRunner().invoke(app, ["watch", "ls", "--format", "json"]).stdout)
    assert [(w["build"], w["configurations"]) for w in listed if w["repo"] == SWEEP_REPO] == [("sweep", 2)]

    sha = hub.push(SWEEP_REPO, adapters[0])
    answer = deliver(hooks, content_update(SWEEP_REPO, sha))
    assert answer.status_code == 202 and answer.json()["status"] == "accepted", answer.text
    flow_run_id = answer.json()["flow_run_id"]
    run = wait_final(deployed, flow_run_id, worker)
    assert run["parameters"] == {"repo": SWEEP_REPO, "sha": sha, "event": "webhook"}

    catalog = open_catalog()
    assert catalog.identify(flow_run_id) == ("sweep", flow_run_id)  # the id the webhook answered with
    sweep = catalog.get_sweep(flow_run_id)
    assert sweep.status == "finished" and sweep.objective == "size" and sweep.name == "mf-test--sweep-lora"
    assert [m.label for m in sweep.members] == ["gptq-4bit-64g", "gptq-4bit-32g"]
    assert all(m.status == "passed" for m in sweep.members), sweep.members
    smallest = min(sweep.members, key=lambda m: m.size_ratio)
    assert sweep.winner_run_id == smallest.run_id and sweep.winner is not None
    for member in sweep.members:  # each configuration built from the pushed commit of the watched adapter
        detail = catalog.get_run(member.run_id)
        assert [(a["uri"], a["sha"]) for a in detail.adapters] == [(f"hf://{SWEEP_REPO}", sha)], detail.adapters
        assert (len(detail.publications) == 1) == (member.run_id == sweep.winner_run_id)
    (publication,) = catalog.get_run(sweep.winner_run_id).publications
    manifest = verify_folder(local_root(publication.uri))  # published, every file's hash checked
    assert manifest["spec"]["quantize"]["group_size"] == smallest.group_size
    assert catalog.get_watch(SWEEP_REPO).last_sha == sha
    (delivery,) = catalog.list_deliveries(repo=SWEEP_REPO)
    assert delivery.status == "started" and delivery.flow_run_id == flow_run_id
    shown = CliRunner().invoke(app, ["catalog", "show", flow_run_id, "--format", "json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["winner_run_id"] == sweep.winner_run_id


def test_webhook_refuses_and_ignores_without_starting_anything(hooks, deployed):
    sha = "a" * 40
    before = len(runs_of(deployed, "on-finetune/on-finetune"))
    cases = [
        (deliver(hooks, content_update(ADAPTER_REPO, sha), secret="not-the-secret-4711"), 401),
        (deliver(hooks, content_update(ADAPTER_REPO, sha), secret=SECRET[:-1]), 401),
        (deliver(hooks, content_update(ADAPTER_REPO, sha), secret=None), 401),
        (deliver(hooks, None, raw=b'{"event": ' + b" " * 70_000 + b"}"), 413),
        (deliver(hooks, None, raw=b"{not json"), 400),
        (deliver(hooks, {"event": {"action": "update"}, "repo": {"name": ADAPTER_REPO}}), 422),
        (deliver(hooks, {**content_update(ADAPTER_REPO, sha), "updatedRefs": [{"ref": "x", "newSha": "zz"}]}), 422),
    ]
    for response, code in cases:
        assert response.status_code == code, (code, response.text)
        assert response.json()["status"] == "error"
        assert SECRET not in response.text and "4711" not in response.text and "Traceback" not in response.text
    ignored = [
        content_update("someone/unwatched", sha),
        content_update(ADAPTER_REPO, sha, scope="discussion"),
        content_update(ADAPTER_REPO, sha, repo_type="dataset"),
        content_update(ADAPTER_REPO, sha, ref="refs/pr/7"),  # a pull request's commit, not main
        {**content_update(ADAPTER_REPO, sha), "updatedRefs": [{"ref": "refs/heads/main", "oldSha": sha,
                                                               "newSha": None}]},  # branch deleted
    ]
    for payload in ignored:
        response = deliver(hooks, payload)
        assert response.status_code == 200 and response.json()["status"] == "ignored", response.text
        assert response.json()["reason"]
    assert len(runs_of(deployed, "on-finetune/on-finetune")) == before
    assert not [d for d in open_catalog().list_deliveries() if d.sha == sha]


def test_webhook_without_a_configured_secret_refuses_everything(set_env):
    from fastapi.testclient import TestClient

    from modelfactory.interfaces.server import create_app

    set_env(MODELFACTORY_WEBHOOK_SECRET=None)
    response = TestClient(create_app()).post("/hooks/huggingface", json=content_update(ADAPTER_REPO, "b" * 40),
                                             headers={"X-Webhook-Secret": ""})
    assert response.status_code == 503 and response.json()["status"] == "error"


def test_burst_of_50_deliveries_for_5_commits_starts_5_runs(hooks, deployed, tiny_llama, tmp_path):
    watch_add(BURST_REPO, "--base", str(tiny_llama), "--spec", str(cheap_spec_file(tmp_path)))
    shas = [hashlib.sha1(f"burst-{i}".encode()).hexdigest() for i in range(5)]
    payloads = [content_update(BURST_REPO, shas[i % 5]) for i in range(50)]
    # The builds only have to be created: keep them queued (paused pool) and delete them after.
    api(deployed, "PATCH", "/work_pools/cpu", is_paused=True)
    try:
        with ThreadPoolExecutor(max_workers=25) as pool:
            answers = list(pool.map(lambda p: deliver(hooks, p), payloads))
        statuses = Counter((a.status_code, a.json()["status"]) for a in answers)
        assert statuses == {(202, "accepted"): 5, (200, "duplicate"): 45}, [a.text for a in answers]
        builds = [r for r in runs_of(deployed, "on-finetune/on-finetune") if r["parameters"]["repo"] == BURST_REPO]
        assert sorted(r["parameters"]["sha"] for r in builds) == sorted(shas)
        accepted = {a.json()["flow_run_id"] for a in answers if a.status_code == 202}
        assert accepted == {r["id"] for r in builds}
        assert all(r["state"]["type"] == "SCHEDULED" for r in builds)
        deliveries = [d for d in open_catalog().list_deliveries(repo=BURST_REPO)]
        assert sorted(d.sha for d in deliveries) == sorted(shas) and {d.status for d in deliveries} == {"started"}
    finally:
        for run in [r for r in runs_of(deployed, "on-finetune/on-finetune") if r["parameters"]["repo"] == BURST_REPO]:
            api(deployed, "DELETE", f"/flow_runs/{run['id']}")
        api(deployed, "PATCH", "/work_pools/cpu", is_paused=False)


def test_watch_cli_adds_lists_and_removes(tiny_llama):
    from modelfactory.interfaces.cli.main import app

    cli = CliRunner()
    repo = "mf-test/cli-lora"
    watch_add(repo, "--base", str(tiny_llama), "--bits", "4", "--group-size", "64", "--max-ppl-increase-pct", "5")
    listed = json.loads(cli.invoke(app, ["watch", "ls", "--format", "json"]).stdout)
    (row,) = [w for w in listed if w["repo"] == repo]
    assert row["kind"] == "adapter" and row["base"] == str(tiny_llama) and row["last_sha"] is None
    assert row["spec"] == {"quantize": {"bits": 4, "group_size": 64}, "gate": {"max_ppl_increase_pct": 5.0}}
    again = cli.invoke(app, ["watch", "add", repo, "--base", str(tiny_llama)])
    assert again.exit_code == 1 and "already on the watch list" in again.output
    bad = cli.invoke(app, ["watch", "add", "mf-test/bad", "--base", str(tiny_llama), "--bits", "5"])
    assert bad.exit_code == 1 and "quantize.bits" in bad.output
    assert cli.invoke(app, ["watch", "rm", repo]).exit_code == 0
    gone = cli.invoke(app, ["watch", "rm", repo])
    assert gone.exit_code == 1 and "not on the watch list" in gone.output


# --------------------------------------------------------------------------- the nightly check, per watch
def test_nightly_check_per_watch_reports_and_fails_naming_the_broken_watch(tmp_path):
    """`check_watch` with a stand-in resolver (no Hub, no Prefect): unchanged, would-start (dry run), and
    an unresolvable repo as an `error` check that does not stop the others; `finish_nightly` then fails
    naming it."""
    from modelfactory.core.errors import SourceNotFoundError, TriggerError
    from modelfactory.triggers import check_watch, finish_nightly

    heads = {"mf-test/same": "1" * 40, "mf-test/moved": "2" * 40}

    def resolve(repo: str, branch: str) -> str:
        assert branch == "main"
        if repo not in heads:
            raise SourceNotFoundError(f"Hub repo {repo!r} does not exist")
        return heads[repo]

    with open_catalog(f"sqlite:///{tmp_path / 'nightly.db'}") as catalog:
        for repo in ("mf-test/gone", "mf-test/moved", "mf-test/same"):
            catalog.add_watch(repo=repo, kind="adapter", base="mf-test/base")
        catalog.set_watch_sha("mf-test/same", heads["mf-test/same"])
        checks = [check_watch(watch=w, resolve_head=resolve, dry_run=True, catalog=catalog)
                  for w in catalog.list_watches()]
        assert [(c.repo, c.action) for c in checks] == [
            ("mf-test/gone", "error"), ("mf-test/moved", "would-start"), ("mf-test/same", "unchanged")]
        assert checks[0].head_sha is None and "does not exist" in checks[0].error
        assert checks[1].head_sha == heads["mf-test/moved"] and checks[1].flow_run_id is None
        assert catalog.list_deliveries() == []  # a dry run claims nothing
        with pytest.raises(TriggerError, match=r"could not check mf-test/gone: .*does not exist.*the others ran"):
            finish_nightly(checks=checks)
        assert finish_nightly(checks=checks[1:]) == checks[1:]
