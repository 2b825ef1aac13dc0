"""The read-only catalog JSON API of ``modelfactory serve`` on SQLite and PostgreSQL (TestClient),
one real HTTP round trip through uvicorn, and the refusal to start on a catalog behind head."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from modelfactory.core.errors import CatalogError
from modelfactory.interfaces.server import api as api_module
from modelfactory.interfaces.server import create_app
from modelfactory.testing.catalog import (
    BASE_A,
    LORA_Y,
    SHA_A,
    Seeded,
    at_revision,
    seed,
)
from modelfactory.testing.server import catalog_app_env, serve_catalog


@pytest.fixture
def api(catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Seeded]]:
    from modelfactory.catalog import open_catalog

    with open_catalog(catalog_url) as cat:
        seeded = seed(cat)
        with catalog_app_env(catalog_url), TestClient(create_app()) as client:
            yield client, seeded


def names(seeded: Seeded, runs: list[dict]) -> list[str]:
    by_id = {v: k for k, v in seeded.ids.items()}
    return [by_id[r["id"]] for r in runs]


def test_runs_endpoint_has_the_ls_filters(api) -> None:
    client, seeded = api
    get = lambda **params: client.get("/api/runs", params=params)  # noqa: E731
    assert names(seeded, get(base=BASE_A, status="passed", sort="speed", limit=2).json()["runs"]) == [
        "a-3g128", "a-3g128-ao"]
    assert names(seeded, get(adapter=LORA_Y, bits=3, desc_act="true").json()["runs"]) == ["a-3g128-ao"]
    assert names(seeded, get(config="gptq-4bit-32g").json()["runs"]) == ["a-4g32"]
    assert names(seeded, get(since="2026-01-08", until="2026-01-08").json()["runs"]) == ["b-4g128"]
    row = get(base=SHA_A[:8], group_size=64).json()["runs"][0]
    assert row["status"] == "rejected" and row["decode_speedup"] == 2.1 and row["started_at"].startswith("2026-01-05")
    bad = get(status="done")
    assert bad.status_code == 400 and bad.json()["detail"]["error"] == "catalog_query"
    assert "is not one of" in bad.json()["detail"]["message"]
    assert get(sort="fastest").status_code == 400 and get(since="soon").status_code == 400
    assert get(limit=0).status_code == 422


def test_runs_and_best_take_the_verdict_bounds(api) -> None:
    """max_kld / min_top1 / min_task_recovery (and sort=kld|top1|recovery) as for `catalog ls` / `best`."""
    client, seeded = api
    get = lambda path="/api/runs", **params: client.get(path, params=params)  # noqa: E731
    assert names(seeded, get(max_kld="0.05").json()["runs"]) == ["b-4g128", "a-8g128", "a-4g32", "a-4g128"]
    assert names(seeded, get(min_top1="95%", base=BASE_A).json()["runs"]) == ["a-8g128", "a-4g32", "a-4g128"]
    assert names(seeded, get(min_task_recovery="97%", sort="recovery").json()["runs"]) == [
        "a-8g128", "a-4g32", "a-4g128", "b-4g128"]
    runs = get(sort="kld", limit=2).json()["runs"]
    assert names(seeded, runs) == ["a-8g128", "a-4g32"] and runs[0]["kld_mean"] == 0.002
    assert runs[0]["top1_agreement_pct"] == 99.5 and runs[0]["task_recovery_pct"] == 100.2
    assert names(seeded, get(sort="top1", base=BASE_A).json()["runs"])[-1] == "a-failed"  # not measured: last
    best = get("/api/best", base=BASE_A, min_task_recovery="97%", max_kld="0.05").json()
    assert best["best"]["id"] == seeded.ids["a-4g128"] and best["candidates"] == 3
    assert best["bounds"] == {"max_kld": 0.05, "min_task_recovery": 97.0}
    none = get("/api/best", base=BASE_A, max_kld="0.001")
    assert none.status_code == 404 and "within a mean KL divergence <= 0.001" in none.json()["detail"]["message"]
    for bad in (get(max_kld="low"), get(min_top1="-5"), get("/api/best", base=BASE_A, min_task_recovery="most")):
        assert bad.status_code == 400 and bad.json()["detail"]["error"] == "catalog_query", bad.json()


def test_run_compare_best_lineage_leaderboard(api) -> None:
    client, seeded = api
    run_id = seeded.ids["a-3g128"]
    detail = client.get(f"/api/runs/{run_id[:8]}").json()
    assert detail["id"] == run_id and {m["name"] for m in detail["metrics"]} >= {"perplexity", "decode_speedup"}
    missing = client.get("/api/runs/ffffffff")
    assert missing.status_code == 404 and "catalog ls" in missing.json()["detail"]["message"]

    compared = client.get("/api/compare", params=[("run", seeded.ids["a-4g128"]), ("run", run_id)]).json()
    assert [r["id"] for r in compared["runs"]] == [seeded.ids["a-4g128"], run_id]
    assert client.get("/api/compare", params={"run": run_id}).status_code == 400

    best = client.get("/api/best", params={"base": BASE_A, "max_ppl_increase": "3%", "by": "speed"}).json()
    assert best["best"]["id"] == run_id and len(best["front"]) == 4 and best["candidates"] == 5
    assert client.get("/api/best", params={"base": BASE_A, "max_ppl_increase": "0.01%"}).status_code == 404
    assert client.get("/api/best", params={"base": "org/none"}).status_code == 404
    assert client.get("/api/best", params={"base": BASE_A, "by": "ppl"}).status_code == 400

    manifest = seeded.manifests["a-3g128"]
    chain = client.get(f"/api/lineage/{manifest}").json()
    assert chain["run_id"] == run_id and chain["nodes"][0] == {"kind": "base", "ref": BASE_A, "sha": SHA_A,
                                                               "detail": {}}
    uri = next(n["ref"] for n in chain["nodes"] if n["kind"] == "artifact")
    assert client.get("/api/lineage", params={"ref": uri}).json()["matched_by"] == "uri"
    assert client.get(f"/api/lineage/{uri}").json()["matched_by"] == "uri"  # slashes in the path
    assert client.get("/api/lineage/file:///nowhere").status_code == 404

    boards = client.get("/api/leaderboard").json()["boards"]
    assert [b["base_uri"] for b in boards] == ["org/mistral-base", BASE_A]


def test_real_http_round_trip(catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfactory.catalog import open_catalog

    with open_catalog(catalog_url) as cat:
        seeded = seed(cat)
    with serve_catalog(catalog_url) as base_url:
        with urllib.request.urlopen(f"{base_url}/api/runs?status=passed&base={BASE_A}&limit=3") as response:
            assert response.headers["content-type"] == "application/json"
            runs = json.load(response)["runs"]
        assert names(seeded, runs) == ["a-8g128", "a-3g128-ao", "a-3g128"]
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base_url}/api/runs/not-a-run")
        assert info.value.code == 404


def test_app_refuses_to_start_on_a_catalog_behind_head(catalog_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with at_revision(catalog_url, "0002"):
        pass
    with catalog_app_env(catalog_url):
        with pytest.raises(CatalogError, match="run `modelfactory catalog upgrade`"):
            with TestClient(create_app()):
                pass


def test_client_mistakes_are_4xx_and_only_database_failures_503(api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: an ambiguous run id prefix (a client mistake) raised a plain CatalogError, which the API
    answered 503 "catalog unreachable"; it is a 400 now, a missing run a 404, a dead database a 503."""
    from modelfactory.catalog import Catalog
    from modelfactory.catalog.engine import create_engine, parse_url

    client, seeded = api
    for suffix in ("1", "2"):
        seeded.catalog.start_run(run_id=f"abcdef-{suffix}", name="x", spec={}, run_key="k")
    for answer in (client.get("/api/runs/abcdef"), client.get("/api/lineage/abcdef"),
                   client.get("/api/compare", params=[("run", "abcdef"), ("run", seeded.ids["a-3g128"])])):
        assert answer.status_code == 400, answer.json()
        assert answer.json()["detail"]["error"] == "catalog_query"
        assert "matches several runs" in answer.json()["detail"]["message"]
    assert client.get("/api/runs/abcdef-3").status_code == 404
    assert client.get("/api/runs", params={"limit": 0}).status_code == 422

    down = Catalog(create_engine(parse_url("postgresql+psycopg://factory@127.0.0.1:1/catalog")))
    monkeypatch.setattr(api_module, "get_catalog", lambda: down)
    try:
        for path in ("/api/runs/abcdef", "/api/runs", "/api/leaderboard"):
            answer = client.get(path)
            assert answer.status_code == 503 and answer.json()["detail"]["error"] == "catalog", answer.json()
            assert "cannot connect to the catalog" in answer.json()["detail"]["message"]
    finally:
        down.dispose()


def test_client_errors_name_neither_server_paths_nor_database_urls(api, catalog_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24.8: ``GET /api/runs/zzzz`` answered "no run with id 'zzzz' in the catalog at sqlite:////…/catalog.db".
    A stranger learns what failed and what to do, not where the server keeps its database or files."""
    from modelfactory.catalog import Catalog
    from modelfactory.catalog.engine import create_engine, parse_url
    from modelfactory.core.settings import get_settings

    client, _seeded = api
    home = str(get_settings().home)
    answer = client.get("/api/runs/zzzz")
    assert answer.status_code == 404
    message = answer.json()["detail"]["message"]
    assert message.startswith("no run with id 'zzzz' in the catalog")
    for secret in ("sqlite", "postgresql", catalog_url.split("://")[-1], home, "catalog.db", "127.0.0.1"):
        assert secret not in message, (secret, message)
    page = client.get("/", params={"base": "no-such-base"})
    assert page.status_code == 404 and "catalog.db" not in page.text and "sqlite" not in page.text

    down = Catalog(create_engine(parse_url("postgresql+psycopg://factory:pw@127.0.0.1:1/catalog")))
    monkeypatch.setattr(api_module, "get_catalog", lambda: down)
    try:
        message = client.get("/api/runs/zzzz").json()["detail"]["message"]
        assert "cannot connect to the catalog" in message
        assert "postgresql" not in message and "127.0.0.1" not in message and "factory" not in message
    finally:
        down.dispose()
