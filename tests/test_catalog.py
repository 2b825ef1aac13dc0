"""Tests of the run catalog, on SQLite and on PostgreSQL.

The PostgreSQL cases (marker ``postgres``) need a server at ``MODELFACTORY_TEST_PG_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``, trust auth). They fail,
not skip, when it cannot be reached; deselect them with ``-m 'not postgres'``. Each test
gets a fresh schema, selected through ``search_path`` in the URL, dropped afterwards (the
``catalog_url`` and ``catalog`` fixtures of conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from modelfactory.catalog import (
    Catalog,
    MetricRecord,
    RunDetail,
    head_revision,
    open_catalog,
)
from modelfactory.catalog.models import Base, created_on
from modelfactory.core.errors import (
    CatalogError,
    CatalogNotFoundError,
    CatalogQueryError,
)
from modelfactory.core.records import GateCheck, Publication
from modelfactory.interfaces.cli.render import run_detail_table, runs_json, runs_table
from modelfactory.testing.catalog import (
    at_revision,
    new_id,
    postgres_schema_url,
    start,
    unopened_catalog,
)
from modelfactory.testing.env import REPO

TABLES = {"runs", "steps", "metrics", "gate_checks", "artifacts", "base_models", "adapters", "run_adapters",
          "publications", "watches", "webhook_deliveries", "run_claims", "sweeps", "sweep_members"}
HEAD = "0009"


# --------------------------------------------------------------------------- schema


def test_fresh_database_is_upgraded_to_head(catalog_url: str) -> None:
    with open_catalog(catalog_url) as cat:
        assert cat.current_revision() == head_revision() == HEAD
        assert TABLES | {"alembic_version"} <= set(inspect(cat.engine).get_table_names())
        cat.upgrade()  # idempotent
        assert cat.current_revision() == HEAD
    if catalog_url.startswith("sqlite"):
        assert Path(make_url(catalog_url).database).exists()


def test_migration_matches_models(catalog: Catalog) -> None:
    with catalog.engine.connect() as conn:
        # ix_runs_id_pattern (0004) is PostgreSQL-only: compared there, skipped on SQLite.
        def include(obj, _name, _type, _reflected, _compare_to) -> bool:
            return created_on(obj, conn.dialect.name)

        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include}), Base.metadata)
    assert diff == []


def test_catalog_behind_head_is_refused_until_upgraded(catalog_url: str) -> None:
    """An empty database is created at head; an existing one behind head is never migrated silently."""
    with at_revision(catalog_url, "0002"):
        pass
    with pytest.raises(CatalogError, match=rf"revision 0002, this modelfactory needs {HEAD}: run `modelfactory "
                                           r"catalog upgrade`"):
        open_catalog(catalog_url)
    with open_catalog(catalog_url, auto_upgrade=True) as cat:  # what `catalog upgrade` does
        assert cat.current_revision() == HEAD
    with open_catalog(catalog_url) as cat:  # now at head: fine
        assert cat.current_revision() == HEAD


def test_tables_without_revision_are_refused(catalog_url: str) -> None:
    with unopened_catalog(catalog_url) as cat, cat.engine.begin() as conn:
        conn.execute(text("CREATE TABLE something_else (id INTEGER)"))
    with pytest.raises(CatalogError, match="has tables \\(something_else\\) but no catalog schema revision"):
        open_catalog(catalog_url)


def test_unknown_revision_in_database_raises(catalog: Catalog) -> None:
    with catalog.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(CatalogError, match="revision 9999, which this version of modelfactory does not know"):
        catalog.ensure_schema()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as cat, cat.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_wal_switch_waits_for_a_writer_on_a_fresh_file(tmp_path: Path) -> None:
    """SQLite fails the WAL switch of a fresh file at once while another connection writes; we wait.

    (Found as two processes opening one new catalog: one failed with "database is locked".)
    """
    path = tmp_path / "fresh.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # the file is still in rollback-journal mode
    release = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    release.start()
    try:
        with open_catalog(f"sqlite:///{path}") as cat, cat.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        writer.close()


def test_default_url_comes_from_settings(tmp_path: Path, set_env) -> None:
    set_env(MODELFACTORY_CATALOG_URL=None, MODELFACTORY_HOME=str(tmp_path / "mfhome"))
    with open_catalog() as cat:
        assert cat.url == f"sqlite:///{tmp_path / 'mfhome' / 'catalog.db'}"
    assert (tmp_path / "mfhome" / "catalog.db").exists()


# --------------------------------------------------------------------------- lifecycle


def test_full_run_lifecycle_round_trips(catalog: Catalog) -> None:
    run_id = start(
        catalog,
        "smollm-lora",
        flow_run_id="flow-1",
        library_versions={"torch": "2.13.0"},
        host={"hostname": "h", "platform": "linux", "python": "3.11", "device": "cpu"},
    )
    adapters = [{"uri": "hf://me/lora", "sha": "a" * 40, "weight": 1.0}]
    base_uri = "hf://HuggingFaceTB/SmolLM2-135M"
    catalog.set_sources(run_id=run_id, base_uri=base_uri, base_sha="b" * 40, adapters=adapters)
    catalog.record_step(run_id=run_id, name="merge", status="failed", duration_s=1.0)
    catalog.record_step(
        run_id=run_id, name="merge", status="ok", duration_s=2.5, output_uri="file:///w/m", detail={"tol": 1e-3}
    )
    catalog.record_step(run_id=run_id, name="quantize", status="reused", duration_s=0.1)
    catalog.record_metrics(
        run_id=run_id,
        metrics=[MetricRecord("perplexity", "fp16", 20.0, ""), MetricRecord("perplexity", "gptq", 99.0, "")],
    )
    catalog.record_metrics(  # upsert: gptq overwritten, delta added, duplicate in one call keeps the last
        run_id=run_id,
        metrics=[
            MetricRecord("perplexity", "gptq", 21.0, ""),
            MetricRecord("perplexity", "delta", 0.0, "%"),
            MetricRecord("perplexity", "delta", 0.05, "%"),
            MetricRecord("size", "", 0.3, "ratio"),
        ],
    )
    rejected = GateCheck(metric="perplexity", threshold=0.01, baseline=20.0, candidate=21.0, observed=0.05,
                         passed=False, message="too high")
    catalog.record_gate(run_id=run_id, checks=[rejected])
    gate = [
        GateCheck(metric="perplexity", threshold=0.1, baseline=20.0, candidate=21.0, observed=0.05, passed=True,
                  message="ok"),
        GateCheck(metric="size", threshold=0.5, baseline=None, candidate=None, observed=0.3, passed=True, message=""),
    ]
    catalog.record_gate(run_id=run_id, checks=gate)  # replaces the first verdict
    catalog.record_artifact(
        run_id=run_id, kind="gptq", uri="file:///store/x", manifest_sha256="c" * 64, size_bytes=5 << 30
    )
    catalog.finish_run(run_id=run_id, status="passed")

    detail = catalog.get_run(run_id)
    assert isinstance(detail, RunDetail)
    assert (detail.name, detail.status, detail.run_key) == ("smollm-lora", "passed", "key-smollm-lora")
    assert detail.error is None and detail.error_kind is None
    assert detail.spec == {"name": "smollm-lora"}
    assert detail.adapters == adapters
    assert detail.base_sha == "b" * 40 and detail.base_uri.startswith("hf://")
    assert detail.library_versions == {"torch": "2.13.0"} and detail.host["device"] == "cpu"
    assert detail.started_at.tzinfo is not None and detail.finished_at >= detail.started_at
    assert [(s.name, s.status, s.duration_s, s.output_uri, s.detail) for s in detail.steps] == [
        ("merge", "ok", 2.5, "file:///w/m", {"tol": 1e-3}),
        ("quantize", "reused", 0.1, None, None),
    ]
    assert {(m.name, m.side): (m.value, m.unit) for m in detail.metrics} == {
        ("perplexity", "fp16"): (20.0, ""),
        ("perplexity", "gptq"): (21.0, ""),
        ("perplexity", "delta"): (0.05, "%"),
        ("size", ""): (0.3, "ratio"),
    }
    assert detail.metric("perplexity", "gptq").value == 21.0
    assert list(detail.gate_checks) == gate and detail.gate_passed is True
    artifacts = [(a.kind, a.manifest_sha256, a.size_bytes) for a in detail.artifacts]
    assert artifacts == [("gptq", "c" * 64, 5 << 30)]  # > 2 GiB: BIGINT

    assert catalog.get_run(run_id[:8]) == detail  # unique prefix
    as_json = json.loads(json.dumps(detail.to_dict()))
    assert as_json["started_at"] == detail.started_at.isoformat() and as_json["steps"][0]["name"] == "merge"


def test_list_runs_filters_and_orders_newest_first(catalog: Catalog) -> None:
    first = start(catalog, "first")
    catalog.set_sources(run_id=first, base_uri="hf://a", base_sha="sha-a", adapters=[])
    catalog.finish_run(run_id=first, status="passed")
    second = start(catalog, "second")
    catalog.set_sources(run_id=second, base_uri="hf://b", base_sha="sha-b", adapters=[])
    catalog.finish_run(run_id=second, status="failed", error="boom\ntraceback", error_kind="quantization")
    third = start(catalog, "third")

    assert [r.id for r in catalog.list_runs()] == [third, second, first]
    assert [r.id for r in catalog.list_runs(limit=2)] == [third, second]
    assert [r.id for r in catalog.list_runs(status="failed")] == [second]
    assert [r.id for r in catalog.list_runs(status="running")] == [third]
    assert [r.id for r in catalog.list_runs(base_sha="sha-a")] == [first]
    assert catalog.list_runs(status="passed", base_sha="sha-b") == []
    failed = catalog.list_runs(status="failed")[0]
    assert failed.error == "boom\ntraceback" and failed.duration_s >= 0
    assert catalog.get_run(second).error_kind == "quantization"
    assert json.loads(runs_json(catalog.list_runs()))[0]["id"] == third
    with pytest.raises(CatalogError, match="is not one of"):
        catalog.list_runs(status="done")
    with pytest.raises(CatalogError, match="limit"):
        catalog.list_runs(limit=0)


def test_get_run_unknown_short_or_ambiguous_ids(catalog: Catalog) -> None:
    for suffix in ("1", "2"):
        catalog.start_run(run_id=f"abcdef-{suffix}", name="x", spec={}, run_key="k")
    with pytest.raises(CatalogError, match="no run with id 'nope'.*modelfactory catalog ls"):
        catalog.get_run("nope")
    with pytest.raises(CatalogError, match="no run with id 'abcde'"):
        catalog.get_run("abcde")  # a prefix under 6 characters is not looked up
    with pytest.raises(CatalogError, match="matches several runs"):
        catalog.get_run("abcdef")
    assert catalog.get_run("abcdef-2").id == "abcdef-2"
    with pytest.raises(CatalogError, match="no run"):
        catalog.get_run("abc%ef")  # LIKE wildcards are escaped
    with pytest.raises(CatalogError, match="no run"):
        catalog.get_run("abcde_")


def test_run_id_prefix_is_an_index_range(catalog: Catalog) -> None:
    """0004: a prefix is a range on the id (SQLite) / LIKE on a byte-order index (PostgreSQL): exact
    prefix matches only, neighbours in sort order excluded, an upper-case prefix finds a lower-case id."""
    ids = ["0f3a2b1c-0000-4000-8000-000000000001", "0f3a2b1d-0000-4000-8000-000000000002",
           "0f3a2b1b-ffff-4000-8000-000000000003", "0f3a2b1c/other", "0f3a2b1c_other"]
    for run_id in ids:
        catalog.start_run(run_id=run_id, name="x", spec={}, run_key="k")
    assert catalog.get_run("0f3a2b1d").id == ids[1]  # not 0f3a2b1c-... (the range's lower neighbour)
    assert catalog.get_run("0f3a2b1b").id == ids[2]
    assert catalog.get_run("0F3A2B1D").id == ids[1]  # ids are lower-case UUIDs
    assert catalog.get_run("0f3a2b1c-").id == ids[0]  # a prefix ending in '-'
    assert catalog.get_run("0f3a2b1c/").id == ids[3] and catalog.get_run("0f3a2b1c_").id == ids[4]
    with pytest.raises(CatalogError, match="matches several runs"):
        catalog.get_run("0f3a2b1c")  # -..., /other and _other
    with pytest.raises(CatalogError, match="no run"):
        catalog.get_run("0f3a2b1e")
    with pytest.raises(CatalogError, match="no run"):
        catalog.get_run("0f3a2b1c-0000-4000-8000-0000000000019")  # longer than any id


def test_invalid_writes_raise(catalog: Catalog) -> None:
    run_id = start(catalog)
    expected = "final run status 'done' is not one of 'passed', 'failed', 'rejected'"
    with pytest.raises(CatalogError, match=expected):
        catalog.finish_run(run_id=run_id, status="done")
    with pytest.raises(CatalogError, match="final run status 'running'"):
        catalog.finish_run(run_id=run_id, status="running")
    with pytest.raises(CatalogError, match="step status"):
        catalog.record_step(run_id=run_id, name="merge", status="great", duration_s=1)
    with pytest.raises(CatalogError, match="side of metric 'ppl'"):
        catalog.record_metrics(run_id=run_id, metrics=[MetricRecord("ppl", "int4", 1.0, "")])
    with pytest.raises(CatalogError, match="already exists"):
        catalog.start_run(run_id=run_id, name="again", spec={}, run_key="k")
    with pytest.raises(CatalogError, match="no run with id 'ghost'.*start_run first"):
        catalog.record_step(run_id="ghost", name="merge", status="ok", duration_s=1)
    with pytest.raises(CatalogError, match="no run with id 'ghost'"):
        catalog.finish_run(run_id="ghost", status="passed")
    assert catalog.get_run(run_id).status == "running"  # nothing above changed the run


def test_client_mistakes_and_missing_rows_are_not_database_failures(catalog: Catalog) -> None:
    """Bug: bad values, ambiguous id prefixes and missing watches/deliveries raised a plain CatalogError
    (what a database failure raises; the API answered 503): they are CatalogQueryError / CatalogNotFoundError."""
    run_id = start(catalog)
    for suffix in ("1", "2"):
        catalog.start_run(run_id=f"abcdef-{suffix}", name="x", spec={}, run_key="k")
    mistakes = {
        "matches several runs": lambda: catalog.get_run("abcdef"),
        "final run status 'done'": lambda: catalog.finish_run(run_id=run_id, status="done"),
        "step status 'great'": lambda: catalog.record_step(run_id=run_id, name="m", status="great", duration_s=1),
        "side of metric 'ppl'": lambda: catalog.record_metrics(run_id=run_id, metrics=[MetricRecord("ppl", "x", 1)]),
        "run status 'done'": lambda: catalog.list_runs(status="done"),
        "limit": lambda: catalog.list_runs(limit=0),
        "already exists": lambda: catalog.start_run(run_id=run_id, name="again", spec={}, run_key="k"),
        "watch kind 'model'": lambda: catalog.add_watch(repo="me/m", kind="model"),
        "needs its base model": lambda: catalog.add_watch(repo="me/lora", kind="adapter"),
        "delivery status 'done'": lambda: catalog.update_delivery(repo="me/lora", sha="f" * 40, status="done"),
    }
    for message, mistake in mistakes.items():
        with pytest.raises(CatalogQueryError, match=message):
            mistake()
    catalog.add_watch(repo="me/lora", base="org/base")
    with pytest.raises(CatalogQueryError, match="already on the watch list"):
        catalog.add_watch(repo="me/lora", base="org/base")
    missing = {
        "no run with id 'ghost'": lambda: catalog.record_step(run_id="ghost", name="m", status="ok", duration_s=1),
        "not on the watch list": lambda: catalog.set_watch_sha("me/other", "f" * 40),
        "no webhook delivery for me/lora@": lambda: catalog.update_delivery(repo="me/lora", sha="f" * 40,
                                                                             status="started"),
    }
    for message, lookup in missing.items():
        with pytest.raises(CatalogNotFoundError, match=message):
            lookup()


def test_a_spec_that_never_validated_is_still_recorded_without_a_configuration(catalog: Catalog) -> None:
    """An invalid spec gets a ``failed`` run row with the reason; its quantize part yields no config columns."""
    run_id = new_id()
    catalog.start_run(run_id=run_id, name="q", spec={"quantize": {"bits": 5}}, run_key="invalid-spec")
    catalog.finish_run(run_id=run_id, status="failed", error="bits=5 is not supported", error_kind="spec")
    run = catalog.get_run(run_id)
    assert run.status == "failed" and run.config is None


# --------------------------------------------------------------------------- connection errors


def test_unreachable_database_raises_with_masked_password() -> None:
    url = "postgresql+psycopg://factory:s3cr3t-pw@127.0.0.1:1/catalog"
    with pytest.raises(CatalogError) as info:
        open_catalog(url)
    message = str(info.value)
    assert "s3cr3t-pw" not in message
    assert "postgresql+psycopg://factory:***@127.0.0.1:1/catalog" in message
    assert "is the database running? check MODELFACTORY_CATALOG_URL" in message
    assert info.value.__cause__ is not None


def test_bad_urls_raise() -> None:
    with pytest.raises(CatalogError, match="not a database URL"):
        open_catalog("not a url")
    with pytest.raises(CatalogError, match="unsupported database 'mysql'"):
        open_catalog("mysql://u:pw@localhost/x")


@pytest.mark.postgres
def test_catalog_url_hides_password() -> None:
    with postgres_schema_url() as url:
        with_password = make_url(url).set(password="hunter2").render_as_string(hide_password=False)
        with open_catalog(with_password) as cat:  # trust auth ignores the password
            assert "hunter2" not in cat.url and "***" in cat.url
            assert "hunter2" not in repr(cat)


# --------------------------------------------------------------------------- concurrency

RUNS_PER_WRITER = 25


def write_runs(catalog: Catalog, tag: str, count: int) -> None:
    for i in range(count):
        run_id = f"{tag}-{i:03d}-{uuid.uuid4().hex[:8]}"
        catalog.start_run(run_id=run_id, name=f"{tag}-{i}", spec={"i": i}, run_key=tag)
        catalog.record_step(run_id=run_id, name="merge", status="ok", duration_s=0.01)
        catalog.record_metrics(run_id=run_id, metrics=[MetricRecord("ppl", "fp16", float(i), "")])
        catalog.finish_run(run_id=run_id, status="passed")


def assert_all_written(catalog: Catalog, tags: list[str]) -> None:
    runs = catalog.list_runs(limit=1000)
    assert len(runs) == RUNS_PER_WRITER * len(tags)
    for tag in tags:
        mine = [r for r in runs if r.run_key == tag]
        assert len(mine) == RUNS_PER_WRITER and all(r.status == "passed" for r in mine)
    detail = catalog.get_run(runs[0].id)
    assert len(detail.steps) == 1 and len(detail.metrics) == 1


def test_two_threads_write_concurrently(catalog: Catalog) -> None:
    barrier, errors = threading.Barrier(2), []

    def writer(tag: str) -> None:
        try:
            barrier.wait()
            write_runs(catalog, tag, RUNS_PER_WRITER)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("t1", "t2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert_all_written(catalog, ["t1", "t2"])


def test_two_processes_write_concurrently(catalog_url: str) -> None:
    """Two processes open the same fresh catalog (both may upgrade it) and write at once."""
    code = (
        "import sys, uuid\n"
        "from modelfactory.catalog import open_catalog, MetricRecord\n"
        "url, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "with open_catalog(url) as catalog:\n"
        "    for i in range(count):\n"
        "        run_id = f'{tag}-{i:03d}-{uuid.uuid4().hex[:8]}'\n"
        "        catalog.start_run(run_id=run_id, name=f'{tag}-{i}', spec={'i': i}, run_key=tag)\n"
        "        catalog.record_step(run_id=run_id, name='merge', status='ok', duration_s=0.01)\n"
        "        catalog.record_metrics(run_id=run_id, metrics=[MetricRecord('ppl', 'fp16', float(i), '')])\n"
        "        catalog.finish_run(run_id=run_id, status='passed')\n"
    )
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, catalog_url, tag, str(RUNS_PER_WRITER)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p1", "p2")
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    with open_catalog(catalog_url, auto_upgrade=False) as catalog:
        assert_all_written(catalog, ["p1", "p2"])


# --------------------------------------------------------------------------- rendering


def test_render_tables(catalog: Catalog) -> None:
    run_id = start(catalog, "rendered")
    catalog.record_metrics(
        run_id=run_id,
        metrics=[MetricRecord("perplexity", "fp16", 20.0, ""), MetricRecord("perplexity", "gptq", 21.5, "")],
    )
    catalog.finish_run(run_id=run_id, status="rejected", error="gate failed", error_kind="gate")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(runs_table(catalog.list_runs()))
    console.print(run_detail_table(catalog.get_run(run_id)))
    out = console.file.getvalue()
    assert run_id[:8] in out and "rejected" in out
    assert "perplexity" in out and "20" in out and "21.5" in out


# --------------------------------------------------------------------------- 0002: sources, publications, watches


def test_upgrade_from_0001_keeps_runs_and_fills_config(catalog_url: str) -> None:
    with at_revision(catalog_url, "0001") as engine:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO runs (id, name, status, run_key, spec, adapters, library_versions, host, started_at) "
                "VALUES ('old-run-0001', 'old', 'passed', 'k', :spec, '[]', '{}', '{}', CURRENT_TIMESTAMP)"
            ), {"spec": json.dumps({"quantize": {"bits": 3, "group_size": 32, "desc_act": True}})})
    with open_catalog(catalog_url, auto_upgrade=True) as cat:  # upgrades 0001 -> head
        assert cat.current_revision() == HEAD
        (run,) = cat.list_runs()
        assert (run.id, run.config) == ("old-run-0001", "gptq-3bit-32g-actorder")


def test_sources_and_publications_round_trip(catalog: Catalog) -> None:
    spec = {"quantize": {"bits": 4, "group_size": 128}}
    runs = []
    for _ in range(2):
        run_id = new_id()
        catalog.start_run(run_id=run_id, name="r", spec=spec, run_key="k")
        catalog.set_sources(run_id=run_id, base_uri="org/base", base_sha="b" * 40, adapters=[
            {"uri": "org/lora-a", "sha": "1" * 40, "weight": 0.7}, {"uri": "org/lora-b", "sha": "2" * 40}])
        runs.append(run_id)
    catalog.set_sources(run_id=runs[1], base_uri="org/base", base_sha="b" * 40,  # re-set: replaced, not added
                        adapters=[{"uri": "org/lora-a", "sha": "1" * 40, "weight": 1.0}])
    with catalog.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM base_models")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM adapters")).scalar() == 2
        assert conn.execute(text("SELECT count(*) FROM run_adapters")).scalar() == 3
        linked = conn.execute(text("SELECT count(DISTINCT base_model_id) FROM runs")).scalar()
    assert linked == 1
    published = Publication(destination="hub", uri="http://hub/org/q/tree/gptq-4bit-128g",
                            manifest_sha256="d" * 64, size_bytes=123, revision="gptq-4bit-128g", commit="e" * 40)
    catalog.record_publication(run_id=runs[0], publication=published)
    detail = catalog.get_run(runs[0])
    assert detail.config == "gptq-4bit-128g"
    (pub,) = detail.publications
    assert isinstance(pub, Publication) and pub.model_dump(exclude={"published_at"}) == published.model_dump(
        exclude={"published_at"})
    assert (pub.destination, pub.revision, pub.commit, pub.reused) == ("hub", "gptq-4bit-128g", "e" * 40, False)
    assert pub.published_at is not None
    as_json = detail.to_dict()["publications"][0]
    assert as_json["commit_sha"] == "e" * 40 and "commit" not in as_json  # the column's name
    with pytest.raises(ValidationError, match="destination"):
        Publication(destination="ftp", uri="ftp://x", manifest_sha256="d" * 64, size_bytes=1)
    with pytest.raises(CatalogError, match="publication destination 'ftp'"):
        catalog.record_publication(run_id=runs[0], publication=Publication.model_construct(  # unvalidated
            destination="ftp", uri="ftp://x", manifest_sha256="d" * 64, size_bytes=1, revision=None, commit=None,
            reused=False))


def test_watch_list(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="needs its base model"):
        catalog.add_watch(repo="me/lora", kind="adapter")
    added = catalog.add_watch(repo="me/lora", base="org/base", spec={"quantize": {"bits": 4}})
    assert (added.repo, added.kind, added.revision, added.last_sha) == ("me/lora", "adapter", "main", None)
    with pytest.raises(CatalogError, match="already on the watch list"):
        catalog.add_watch(repo="me/lora", base="org/base")
    catalog.add_watch(repo="org/base2", kind="base")
    catalog.set_watch_sha("me/lora", "f" * 40)
    assert catalog.get_watch("me/lora").last_sha == "f" * 40
    assert [w.repo for w in catalog.list_watches()] == ["me/lora", "org/base2"]
    assert catalog.remove_watch("me/lora") is True and catalog.remove_watch("me/lora") is False
    assert catalog.get_watch("me/lora") is None
    with pytest.raises(CatalogError, match="not on the watch list"):
        catalog.set_watch_sha("me/lora", "f" * 40)


def test_claim_delivery_once_per_sha_and_delivery_id(catalog: Catalog) -> None:
    first, record = catalog.claim_delivery(repo="me/lora", sha="a" * 40, event="repo.content", delivery_id="d1")
    assert first and record.status == "accepted"
    again, existing = catalog.claim_delivery(repo="me/lora", sha="a" * 40, event="repo.content", delivery_id="d2")
    assert not again and existing.delivery_id == "d1"
    replay, existing = catalog.claim_delivery(repo="me/lora", sha="b" * 40, event="repo.content", delivery_id="d1")
    assert not replay and existing.sha == "a" * 40
    catalog.update_delivery(repo="me/lora", sha="a" * 40, status="started", flow_run_id="fr-1")
    (listed,) = catalog.list_deliveries()
    assert (listed.status, listed.flow_run_id) == ("started", "fr-1")

    # A burst of identical deliveries from several threads: exactly one claim wins.
    results: list[bool] = []
    def claim() -> None:
        results.append(catalog.claim_delivery(repo="me/lora", sha="c" * 40, event="repo.content")[0])
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
