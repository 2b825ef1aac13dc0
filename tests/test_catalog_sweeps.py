"""Sweeps in the catalog on SQLite and PostgreSQL: a sweep of 3 member runs written with the catalog
API (no model), its matrix read back, rendered (terminal, CSV, JSON, Markdown), shown by
``catalog show`` / ``catalog sweeps``, served by ``/api/sweeps`` and on the leaderboard page."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from modelfactory.catalog import Catalog, MetricRecord, SweepDetail, open_catalog
from modelfactory.reports import sweep_matrix, sweep_matrix_markdown
from modelfactory.catalog.schema import alembic_config
from modelfactory.core.errors import CatalogNotFoundError, CatalogQueryError
from modelfactory.core.records import GateCheck
from modelfactory.core.sweep_spec import SweepSpec
from modelfactory.interfaces.server import create_app
from modelfactory.testing.catalog import at_revision, catalog_cli
from modelfactory.testing.server import catalog_app_env

BASE, SHA = "org/sweep-base", "5" * 40

#: label → (status, ppl +%, size, speed-up, KL mean or None, arc recovery % or None, host, GPU)
MEMBERS = {
    "gptq-4bit-128g": ("passed", 2.0, 0.30, 1.5, 0.020, 98.0, "gpu-a", "0"),
    "gptq-4bit-64g": ("passed", 1.5, 0.32, 1.2, 0.015, 99.0, "gpu-a", "1"),
    "gptq-4bit-32g": ("rejected", 9.0, 0.35, 0.9, None, None, "gpu-b", "0"),
}


def sweep_spec() -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "demo-sweep", "base": {"uri": BASE}, "objective": "quality",
        "configs": [{"group_size": 128}, {"group_size": 64, "damp_percent": 0.1},
                    {"group_size": 32, "calibration": {"num_samples": 64}}]})


@dataclass
class Recorded:
    sweep_id: str
    runs: dict[str, str] = field(default_factory=dict)  # label → run id


def record_sweep(catalog: Catalog, *, finish: bool = True, sweep_id: str | None = None) -> Recorded:  # noqa: F811
    """A 3-configuration sweep as the sweep flow records it: each member an ordinary run."""
    spec = sweep_spec()
    recorded = Recorded(sweep_id or str(uuid.uuid4()))
    catalog.start_sweep(sweep_id=recorded.sweep_id, name=spec.name, spec=spec.model_dump(mode="json"),
                        objective=spec.objective, publish_mode=spec.publish_mode, flow_run_id="flow-1")
    catalog.set_sweep_base(sweep_id=recorded.sweep_id, base_uri=BASE, base_sha=SHA)
    for position, member in enumerate(spec.members()):
        status, ppl, size, speed, kld, arc, host, gpu = MEMBERS[member.label]
        run_id = recorded.runs[member.label] = str(uuid.uuid4())
        member_spec = spec.member_spec(member)
        catalog.start_run(run_id=run_id, name=member_spec.name, spec=member_spec.model_dump(mode="json"),
                          run_key=f"key-{member.label}")
        catalog.add_member(sweep_id=recorded.sweep_id, run_id=run_id, label=member.label, kernel=member.kernel,
                           position=position)
        catalog.set_sources(run_id=run_id, base_uri=BASE, base_sha=SHA, adapters=[])
        catalog.record_step(run_id=run_id, name="gpu-stage", status="ok", duration_s=40.0 + position,
                            detail={"hostname": host, "cuda_visible_devices": gpu, "device": "cuda:0"})
        metrics = [MetricRecord("ppl_increase_pct", "delta", ppl, "%"), MetricRecord("size_ratio", "delta", size, "x"),
                   MetricRecord("decode_speedup", "delta", speed, "x"),
                   MetricRecord("kld_mean", "gptq", 99.0, "nats")]  # another side: not the matrix's
        if kld is not None:
            metrics += [MetricRecord("kld_mean", "delta", kld, "nats"), MetricRecord("kld_p99", "delta", kld * 10, "nats"),
                        MetricRecord("top1_agreement_pct", "delta", 100 - kld * 100, "%"),
                        MetricRecord("task_recovery_pct_arc_easy", "delta", arc, "%")]
        catalog.record_metrics(run_id=run_id, metrics=metrics)
        catalog.record_gate(run_id=run_id, checks=[GateCheck(
            metric="max_ppl_increase_pct", threshold=5.0, baseline=10.0, candidate=10 * (1 + ppl / 100),
            observed=ppl, passed=status == "passed", message=f"ppl +{ppl}%")])
        catalog.finish_run(run_id=run_id, status=status)
    if finish:
        runs = recorded.runs
        catalog.finish_sweep(sweep_id=recorded.sweep_id, winner_run_id=runs["gptq-4bit-64g"],
                             front=[runs["gptq-4bit-128g"], runs["gptq-4bit-64g"]])
    return recorded


@pytest.fixture
def recorded(catalog: Catalog) -> Recorded:  # noqa: F811
    return record_sweep(catalog)


# --------------------------------------------------------------------------- catalog API


def test_sweep_round_trips_with_its_matrix(catalog: Catalog, recorded: Recorded) -> None:  # noqa: F811
    detail = catalog.get_sweep(recorded.sweep_id)
    assert catalog.get_sweep(recorded.sweep_id[:8]) == detail
    assert catalog.get_sweep(recorded.sweep_id[:8].upper()).id == recorded.sweep_id
    assert (detail.name, detail.status, detail.objective, detail.publish_mode) == (
        "demo-sweep", "finished", "quality", "winner")
    assert (detail.base_uri, detail.base_sha, detail.flow_run_id) == (BASE, SHA, "flow-1")
    assert SweepSpec.model_validate(detail.spec) == sweep_spec()
    assert detail.finished_at is not None and detail.finished_at >= detail.created_at
    runs = recorded.runs
    assert detail.winner_run_id == runs["gptq-4bit-64g"] and detail.winner.label == "gptq-4bit-64g"
    assert detail.front == (runs["gptq-4bit-128g"], runs["gptq-4bit-64g"])
    assert [m.label for m in detail.members] == ["gptq-4bit-128g", "gptq-4bit-64g", "gptq-4bit-32g"]
    g128, g64, g32 = detail.members
    assert [(m.on_front, m.winner, m.status) for m in detail.members] == [
        (True, False, "passed"), (True, True, "passed"), (False, False, "rejected")]
    assert (g64.run_id, g64.kernel, g64.position, g64.config, g64.bits, g64.group_size, g64.desc_act) == (
        runs["gptq-4bit-64g"], sweep_spec().benchmark.kernel, 1, "gptq-4bit-64g", 4, 64, False)
    assert (g128.damp_percent, g64.damp_percent, g32.damp_percent) == (0.05, 0.1, 0.05)
    assert (g128.calibration_samples, g32.calibration_samples) == (128, 64)
    assert (g64.ppl_increase_pct, g64.size_ratio, g64.decode_speedup, g64.memory_ratio) == (1.5, 0.32, 1.2, None)
    assert (g64.kld_mean, g64.kld_p99, g64.top1_agreement_pct) == (0.015, 0.15, 98.5)
    assert g64.task_recovery_pct == {"arc_easy": 99.0}
    assert (g32.kld_mean, g32.task_recovery_pct) == (None, {})  # a side other than delta is not read
    assert [(m.hostname, m.cuda_visible_devices, m.device, m.gpu_stage_s) for m in detail.members] == [
        ("gpu-a", "0", "cuda:0", 40.0), ("gpu-a", "1", "cuda:0", 41.0), ("gpu-b", "0", "cuda:0", 42.0)]
    assert json.loads(json.dumps(detail.to_dict()))["members"][1]["task_recovery_pct"] == {"arc_easy": 99.0}
    # each member is an ordinary run: ls, best and show see it
    assert catalog.get_run(runs["gptq-4bit-64g"]).status == "passed"


def test_list_sweeps_newest_first_with_filters(catalog: Catalog, recorded: Recorded) -> None:  # noqa: F811
    running = record_sweep(catalog, finish=False)
    other = str(uuid.uuid4())
    catalog.start_sweep(sweep_id=other, name="no-base", spec={}, objective="size", publish_mode="none")
    catalog.fail_sweep(sweep_id=other, error="merge failed: out of memory", error_kind="merge")
    listed = catalog.list_sweeps()
    assert [s.id for s in listed] == [other, running.sweep_id, recorded.sweep_id]
    failed, still, done = listed
    assert (done.status, done.members, done.passed, done.winner_label, done.winner_run_id) == (
        "finished", 3, 2, "gptq-4bit-64g", recorded.runs["gptq-4bit-64g"])
    assert (still.status, still.winner_label, still.members) == ("running", None, 3)
    assert (failed.status, failed.members, failed.passed, failed.error) == (
        "failed", 0, 0, "merge failed: out of memory")
    assert [s.id for s in catalog.list_sweeps(status="finished")] == [recorded.sweep_id]
    assert [s.id for s in catalog.list_sweeps(base=SHA[:8])] == [running.sweep_id, recorded.sweep_id]
    assert [s.id for s in catalog.list_sweeps(base=BASE, limit=1)] == [running.sweep_id]
    assert catalog.list_sweeps(base="org/unknown") == []
    with pytest.raises(CatalogQueryError, match="sweep status 'done' is not one of"):
        catalog.list_sweeps(status="done")  # type: ignore[arg-type]
    with pytest.raises(CatalogQueryError, match="cannot list 0 sweeps"):
        catalog.list_sweeps(limit=0)
    assert catalog.get_sweep(other).members == () and catalog.get_sweep(other).error_kind == "merge"


def test_a_run_in_two_sweeps_keeps_each_sweeps_label(catalog: Catalog, recorded: Recorded) -> None:  # noqa: F811
    """A member run may be linked again (e.g. a later sweep that reused the build) under another label."""
    runs, reuse = recorded.runs, str(uuid.uuid4())
    catalog.start_sweep(sweep_id=reuse, name="reuse", spec={}, objective="speed", publish_mode="none")
    catalog.add_member(sweep_id=reuse, run_id=runs["gptq-4bit-128g"], label="again-128g", kernel="k", position=0)
    catalog.add_member(sweep_id=reuse, run_id=runs["gptq-4bit-64g"], label="again-64g", kernel="k", position=1)
    catalog.finish_sweep(sweep_id=reuse, winner_run_id=runs["gptq-4bit-128g"], front=[runs["gptq-4bit-128g"]])
    assert [(s.id, s.winner_label, s.members) for s in catalog.list_sweeps()] == [
        (reuse, "again-128g", 2), (recorded.sweep_id, "gptq-4bit-64g", 3)]
    again = catalog.get_sweep(reuse)
    assert [(m.label, m.winner, m.on_front) for m in again.members] == [("again-128g", True, True),
                                                                         ("again-64g", False, False)]
    original = catalog.get_sweep(recorded.sweep_id)  # unchanged by the other sweep's verdict
    assert [(m.winner, m.on_front) for m in original.members] == [(False, True), (True, True), (False, False)]


def test_sweep_writes_refuse_what_is_not_a_sweep(catalog: Catalog, recorded: Recorded) -> None:  # noqa: F811
    sweep_id, runs = recorded.sweep_id, recorded.runs
    with pytest.raises(CatalogQueryError, match="already exists"):
        catalog.start_sweep(sweep_id=sweep_id, name="again", spec={}, objective="quality", publish_mode="winner")
    with pytest.raises(CatalogQueryError, match="sweep objective 'best' is not one of"):
        catalog.start_sweep(sweep_id="x", name="x", spec={}, objective="best", publish_mode="winner")  # type: ignore
    with pytest.raises(CatalogQueryError, match="publish mode 'some' is not one of"):
        catalog.start_sweep(sweep_id="x", name="x", spec={}, objective="quality", publish_mode="some")  # type: ignore
    with pytest.raises(CatalogNotFoundError, match="call start_sweep first"):
        catalog.add_member(sweep_id="nope", run_id=runs["gptq-4bit-64g"], label="l", kernel="k")
    with pytest.raises(CatalogQueryError, match="is finished: members are added while it runs"):
        catalog.add_member(sweep_id=sweep_id, run_id=runs["gptq-4bit-64g"], label="l", kernel="k")
    with pytest.raises(CatalogNotFoundError, match="no sweep with id 'nope'"):
        catalog.finish_sweep(sweep_id="nope", winner_run_id=None, front=[])
    with pytest.raises(CatalogQueryError, match="final sweep status 'running' is not one of"):
        catalog.finish_sweep(sweep_id=sweep_id, winner_run_id=None, front=[], status="running")  # type: ignore

    fresh = record_sweep(catalog, finish=False)
    with pytest.raises(CatalogNotFoundError, match="call start_run first"):
        catalog.add_member(sweep_id=fresh.sweep_id, run_id="no-such-run", label="l", kernel="k")
    with pytest.raises(CatalogQueryError, match="already has run .* or a member labelled 'gptq-4bit-64g'"):
        catalog.add_member(sweep_id=fresh.sweep_id, run_id=runs["gptq-4bit-32g"], label="gptq-4bit-64g", kernel="k")
    with pytest.raises(CatalogQueryError, match=f"run '{runs['gptq-4bit-64g']}' is no member of sweep"):
        catalog.finish_sweep(sweep_id=fresh.sweep_id, winner_run_id=runs["gptq-4bit-64g"], front=[])
    assert catalog.get_sweep(fresh.sweep_id).status == "running"  # the refused finish changed nothing
    # a member run may belong to several sweeps (e.g. reused); position defaults to after the last
    catalog.add_member(sweep_id=fresh.sweep_id, run_id=runs["gptq-4bit-32g"], label="old-32g", kernel="k")
    assert [(m.label, m.position) for m in catalog.get_sweep(fresh.sweep_id).members][-1] == ("old-32g", 3)
    catalog.finish_sweep(sweep_id=fresh.sweep_id, winner_run_id=None, front=[], status="failed",
                         error="no configuration passed", error_kind="gate")
    failed = catalog.get_sweep(fresh.sweep_id)
    assert (failed.status, failed.winner, failed.front, failed.error) == ("failed", None, (), "no configuration passed")
    assert not any(m.on_front for m in failed.members)


def test_discarding_an_unfinished_sweep_frees_its_id_and_keeps_its_member_runs(catalog: Catalog,  # noqa: F811
                                                                               recorded: Recorded) -> None:
    """Before a retry under the same id (an on-finetune run's sweep): the earlier attempt's record goes, its
    member runs stay (also in the other sweeps they belong to); a finished sweep is never discarded."""
    retried = record_sweep(catalog, finish=False, sweep_id=str(uuid.uuid4()))
    catalog.fail_sweep(sweep_id=retried.sweep_id, error="attempt 1 failed")
    assert catalog.discard_sweep(sweep_id=retried.sweep_id) == 3
    with pytest.raises(CatalogNotFoundError):
        catalog.get_sweep(retried.sweep_id)
    assert all(catalog.get_run(run_id).id == run_id for run_id in retried.runs.values())
    record_sweep(catalog, finish=False, sweep_id=retried.sweep_id)  # the same id and labels, afresh
    assert len(catalog.get_sweep(retried.sweep_id).members) == 3
    with pytest.raises(CatalogQueryError, match="finished: its record is kept"):
        catalog.discard_sweep(sweep_id=recorded.sweep_id)
    with pytest.raises(CatalogNotFoundError, match="no sweep with id 'nope'"):
        catalog.discard_sweep(sweep_id="nope")
    assert len(catalog.get_sweep(recorded.sweep_id).members) == 3


def test_sweep_ids_resolve_like_run_ids(catalog: Catalog, recorded: Recorded) -> None:  # noqa: F811
    for suffix in ("1", "2"):
        catalog.start_sweep(sweep_id=f"abcdef-{suffix}", name="x", spec={}, objective="quality", publish_mode="none")
    with pytest.raises(CatalogQueryError, match="sweep id prefix 'abcdef' matches several sweeps"):
        catalog.get_sweep("abcdef")
    with pytest.raises(CatalogNotFoundError, match="no sweep with id 'abcdef-3'.*`modelfactory catalog sweeps`"):
        catalog.get_sweep("abcdef-3")
    with pytest.raises(CatalogNotFoundError, match=r"prefixes need 6\+ characters"):
        catalog.get_sweep(recorded.sweep_id[:5])
    assert catalog.identify(recorded.sweep_id[:8]) == ("sweep", recorded.sweep_id)
    run_id = recorded.runs["gptq-4bit-64g"]
    assert catalog.identify(run_id[:8]) == ("run", run_id)
    catalog.start_run(run_id="fedcba-run", name="r", spec={}, run_key="k")
    catalog.start_sweep(sweep_id="fedcba-sweep", name="s", spec={}, objective="quality", publish_mode="none")
    with pytest.raises(CatalogQueryError, match="id 'fedcba' matches run fedcba-run and sweep fedcba-sweep"):
        catalog.identify("fedcba")
    assert catalog.identify("fedcba-s") == ("sweep", "fedcba-sweep")
    with pytest.raises(CatalogNotFoundError, match="no run or sweep with id 'ffffffff'"):
        catalog.identify("ffffffff")


def test_upgrade_from_0005_adds_the_sweep_tables_and_downgrade_drops_them(catalog_url: str) -> None:  # noqa: F811
    with at_revision(catalog_url, "0005") as engine:
        assert "sweeps" not in inspect(engine).get_table_names()
    with open_catalog(catalog_url, auto_upgrade=True) as cat:
        recorded = record_sweep(cat)
        assert {"sweeps", "sweep_members"} <= set(inspect(cat.engine).get_table_names())
        assert len(cat.get_sweep(recorded.sweep_id).members) == 3
        with cat.engine.begin() as connection:
            command.downgrade(alembic_config(connection=connection), "0005")
        assert not {"sweeps", "sweep_members"} & set(inspect(cat.engine).get_table_names())
        with cat.engine.connect() as connection:  # the runs stay (read in SQL: at 0005 runs lack 0007's columns)
            status = connection.execute(text("SELECT status FROM runs WHERE id = :id"),
                                        {"id": recorded.runs["gptq-4bit-64g"]}).scalar()
        assert status == "passed"


# --------------------------------------------------------------------------- rendering


def test_matrix_markdown_marks_winner_and_front(catalog: Catalog, recorded: Recorded) -> None:  # noqa: F811
    detail = catalog.get_sweep(recorded.sweep_id)
    markdown = sweep_matrix_markdown(detail)
    assert markdown == sweep_matrix_markdown(detail)  # pure
    lines = markdown.splitlines()
    assert lines[0] == ("### sweep demo-sweep · finished · 3 configurations · objective quality · "
                        "winner gptq-4bit-64g")
    header = next(line for line in lines if line.startswith("|  | branch"))
    assert header.split(" | ")[1:] == ["branch", "kernel", "bits", "group", "act-order", "damp", "calib", "status",
                                       "ppl +%", "size", "speed-up", "KL mean", "KL p99", "top-1 %",
                                       "arc_easy recovery %", "GPU |"]
    rows = [line for line in lines if line.startswith("| ") and "`gptq" in line]
    assert rows == [
        "| ◆ | `gptq-4bit-128g` | gptq_torch | 4 | 128 | no | 0.05 | 128 | passed | 2 | 0.3 | 1.5 | 0.02 | 0.2 "
        "| 98 | 98 | gpu-a · GPU 0 |".replace("gptq_torch", detail.members[0].kernel),
        "| ★◆ | `gptq-4bit-64g` | gptq_torch | 4 | 64 | no | 0.1 | 128 | passed | 1.5 | 0.32 | 1.2 | 0.015 | 0.15 "
        "| 98.5 | 99 | gpu-a · GPU 1 |".replace("gptq_torch", detail.members[1].kernel),
        "|  | `gptq-4bit-32g` | gptq_torch | 4 | 32 | no | 0.05 | 64 | rejected | 9 | 0.35 | 0.9 | - | - | - | - "
        "| gpu-b · GPU 0 |".replace("gptq_torch", detail.members[2].kernel)]
    assert "★ winner: closest to fp16" in markdown and "◆ Pareto front" in markdown


def test_matrix_leaves_out_what_no_member_measured(catalog: Catalog) -> None:  # noqa: F811
    """A sweep whose benchmark measured no KL divergence or tasks, in the factory process (no GPU
    stage step), still finishing: those columns are absent rather than a column of dashes."""
    recorded = record_sweep(catalog, finish=False)
    detail = catalog.get_sweep(recorded.sweep_id)
    plain = SweepDetail(**{**{f: getattr(detail, f) for f in SweepDetail.__dataclass_fields__},
                           "members": tuple(type(m)(**{**m.to_dict(), "kld_mean": None, "kld_p99": None,
                                                       "top1_agreement_pct": None, "task_recovery_pct": {},
                                                       "hostname": None, "cuda_visible_devices": None,
                                                       "device": None})
                                            for m in detail.members)})
    headers, rows = sweep_matrix(plain)
    assert headers == ["", "branch", "kernel", "bits", "group", "act-order", "damp", "calib", "status", "ppl +%",
                       "size", "speed-up"]
    assert [row[0] for row in rows] == ["", "", ""]  # running: no winner, no front yet
    assert "no winner yet" in sweep_matrix_markdown(plain).splitlines()[0]


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator:  # noqa: F811
    from modelfactory.core.settings import get_settings

    with open_catalog(catalog_url) as cat:
        recorded = record_sweep(cat)
    monkeypatch.setenv("MODELFACTORY_CATALOG_URL", catalog_url)
    monkeypatch.setenv("COLUMNS", "250")
    get_settings.cache_clear()

    yield catalog_cli(), recorded, catalog_url
    get_settings.cache_clear()


def test_cli_show_prints_a_sweeps_matrix(cli) -> None:
    invoke, recorded, url = cli
    table = invoke("show", recorded.sweep_id[:8])
    assert "sweep demo-sweep · finished · 3 configurations" in table and "winner gptq-4bit-64g" in table
    assert all(label in table for label in MEMBERS) and "★◆" in table and "gpu-b · GPU 0" in table
    shown = json.loads(invoke("show", recorded.sweep_id, "--format", "json"))
    assert shown["id"] == recorded.sweep_id and shown["winner_run_id"] == recorded.runs["gptq-4bit-64g"]
    assert [(m["label"], m["on_front"], m["winner"]) for m in shown["members"]] == [
        ("gptq-4bit-128g", True, False), ("gptq-4bit-64g", True, True), ("gptq-4bit-32g", False, False)]
    rows = list(csv.DictReader(io.StringIO(invoke("show", recorded.sweep_id, "--format", "csv"))))
    assert [(r["label"], r["winner"], r["hostname"], r["recovery_arc_easy"]) for r in rows] == [
        ("gptq-4bit-128g", "False", "gpu-a", "98.0"), ("gptq-4bit-64g", "True", "gpu-a", "99.0"),
        ("gptq-4bit-32g", "False", "gpu-b", "")]
    run_id = recorded.runs["gptq-4bit-32g"]  # runs keep working
    assert json.loads(invoke("show", run_id[:8], "--format", "json"))["id"] == run_id
    with open_catalog(url) as cat:
        cat.start_run(run_id="fedcba-run", name="r", spec={}, run_key="k")
        cat.start_sweep(sweep_id="fedcba-sweep", name="s", spec={}, objective="quality", publish_mode="none")
    assert "matches run fedcba-run and sweep fedcba-sweep" in invoke("show", "fedcba", code=1)
    assert "no run or sweep with id 'ffffffff'" in invoke("show", "ffffffff", code=1)


def test_cli_sweeps_lists_them(cli) -> None:
    invoke, recorded, _ = cli
    table = invoke("sweeps")
    assert recorded.sweep_id[:8] in table and "gptq-4bit-64g" in table and "finished" in table
    listed = json.loads(invoke("sweeps", "--status", "finished", "--format", "json"))
    assert [(s["id"], s["members"], s["passed"]) for s in listed] == [(recorded.sweep_id, 3, 2)]
    rows = list(csv.DictReader(io.StringIO(invoke("sweeps", "--base", BASE, "--format", "csv"))))
    assert [(r["id"], r["winner_label"]) for r in rows] == [(recorded.sweep_id, "gptq-4bit-64g")]
    assert json.loads(invoke("sweeps", "--status", "running", "--format", "json")) == []
    assert "sweep status 'done' is not one of" in invoke("sweeps", "--status", "done", code=1)


# --------------------------------------------------------------------------- API and page


@pytest.fixture
def api(catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator:  # noqa: F811
    with open_catalog(catalog_url) as cat:
        recorded = record_sweep(cat)
        with catalog_app_env(catalog_url), TestClient(create_app()) as client:
            yield client, recorded, cat


def test_api_sweeps(api) -> None:
    client, recorded, cat = api
    listed = client.get("/api/sweeps").json()["sweeps"]
    assert [(s["id"], s["winner_label"], s["members"]) for s in listed] == [(recorded.sweep_id, "gptq-4bit-64g", 3)]
    assert client.get("/api/sweeps", params={"status": "running"}).json() == {"sweeps": []}
    assert client.get("/api/sweeps", params={"base": SHA[:10]}).json()["sweeps"][0]["id"] == recorded.sweep_id
    shown = client.get(f"/api/sweeps/{recorded.sweep_id[:8]}")
    assert shown.status_code == 200 and shown.json()["id"] == recorded.sweep_id
    assert [m["cuda_visible_devices"] for m in shown.json()["members"]] == ["0", "1", "0"]
    assert shown.json()["front"] == [recorded.runs["gptq-4bit-128g"], recorded.runs["gptq-4bit-64g"]]

    for suffix in ("1", "2"):
        cat.start_sweep(sweep_id=f"abcdef-{suffix}", name="x", spec={}, objective="quality", publish_mode="none")
    ambiguous = client.get("/api/sweeps/abcdef")
    assert ambiguous.status_code == 400 and ambiguous.json()["detail"]["error"] == "catalog_query"
    assert "matches several sweeps" in ambiguous.json()["detail"]["message"]
    missing = client.get("/api/sweeps/abcdef-3")
    assert missing.status_code == 404 and missing.json()["detail"]["error"] == "catalog_not_found"
    bad = client.get("/api/sweeps", params={"status": "done"})
    assert bad.status_code == 400 and "is not one of" in bad.json()["detail"]["message"]
    assert client.get("/api/sweeps", params={"limit": 0}).status_code == 422


def test_leaderboard_page_lists_recent_sweeps(api) -> None:
    client, recorded, _ = api
    html = client.get("/leaderboard").text
    assert html.count('<section class="sweeps">') == 1 and html.count('<article class="sweep"') == 1
    section = html.split('<section class="sweeps">')[1]
    assert "winner gptq-4bit-64g" in section and "<script" not in html
    winner_run = recorded.runs["gptq-4bit-64g"]
    assert f'<tr class="passed winner front" data-run="{winner_run}">' in section
    assert f'<tr class="rejected" data-run="{recorded.runs["gptq-4bit-32g"]}">' in section
    assert f'href="/api/runs/{winner_run}"' in section and f'href="/api/sweeps/{recorded.sweep_id}"' in section
    assert "http" not in html.split("<body>")[1].replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert '<section class="sweeps">' not in client.get("/leaderboard", params={"sweeps": 0}).text
    assert client.get("/leaderboard", params={"sweeps": 51}).status_code == 422
    assert '<article class="sweep"' in client.get("/leaderboard", params={"base": BASE}).text
