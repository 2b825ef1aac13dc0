"""Catalog support for tests and benchmarks: fresh PostgreSQL schemas, catalogs held at an old
revision, bare runs, and :func:`seed`, a small catalog whose query answers are worked out by hand
(the expected results live in tests/test_catalog_queries.py; the API, CLI and page tests reuse it)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import text

from modelfactory.catalog import Catalog, MetricRecord
from modelfactory.core.records import GateCheck, Publication

#: The PostgreSQL test server (trust auth; .ci/run starts it). Tests marked ``postgres`` use it.
PG_URL = os.environ.get("MODELFACTORY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL test server cannot be reached (the message says how to start or skip it)."""


@contextmanager
def postgres_schema_url(admin_url: str = PG_URL, *, prefix: str = "mf_test") -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema on *admin_url*'s server (dropped with everything in it
    on exit)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        raise PostgresUnavailable(
            f"PostgreSQL is not reachable at {admin_url} ({exc.orig}). Start it with "
            f"`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, set "
            f"MODELFACTORY_TEST_PG_URL, or deselect these tests with -m 'not postgres'") from exc
    try:
        # search_path in the URL: every connection (Alembic's version table included) uses it.
        yield make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def unopened_catalog(url: str) -> Iterator[Catalog]:
    """A catalog on *url* that was not opened: no schema check, no upgrade."""
    from modelfactory.catalog.engine import create_engine, parse_url

    cat = Catalog(create_engine(parse_url(url)))
    try:
        yield cat
    finally:
        cat.dispose()


@contextmanager
def at_revision(url: str, revision: str) -> Iterator:
    """The engine of the catalog at *url*, upgraded only as far as *revision* (an old catalog)."""
    with unopened_catalog(url) as cat:
        cat.upgrade(revision)
        yield cat.engine


def new_id() -> str:
    return str(uuid.uuid4())


def start(catalog: Catalog, name: str = "demo", **kwargs) -> str:
    """Start a bare run called *name*; its id."""
    run_id = new_id()
    catalog.start_run(run_id=run_id, name=name, spec={"name": name}, run_key=f"key-{name}", **kwargs)
    return run_id


# --------------------------------------------------------------------------- the seeded catalog
BASE_A, SHA_A = "org/llama-base", "a1" * 20
BASE_B, SHA_B = "org/mistral-base", "b2" * 20
LORA_X, SHA_X = "me/lora-x", "c3" * 20
LORA_Y, SHA_Y = "me/lora-y", "d4" * 20

#: name: (base, adapters, bits, group, desc_act, status, ppl increase %, speed-up, size, memory, day of Jan 2026)
BUILDS = {
    "a-4g128":    ("A", ["X"], 4, 128, False, "passed", 1.0, 1.30, 0.30, 0.32, 1),
    "a-4g32":     ("A", ["X"], 4, 32, False, "passed", 0.8, 1.20, 0.33, 0.35, 2),
    "a-3g128":    ("A", ["X"], 3, 128, False, "passed", 2.5, 1.60, 0.24, 0.27, 3),
    "a-3g128-ao": ("A", ["X", "Y"], 3, 128, True, "passed", 2.5, 1.55, 0.24, 0.27, 4),  # dominated by a-3g128
    "a-2g64":     ("A", ["Y"], 2, 64, False, "rejected", 9.0, 2.10, 0.15, 0.19, 5),
    "a-8g128":    ("A", [], 8, 128, False, "passed", 0.1, 0.90, 0.55, 0.57, 6),
    "a-failed":   ("A", ["X"], 4, 128, False, "failed", None, None, None, None, 7),
    "b-4g128":    ("B", ["Y"], 4, 128, False, "passed", 1.5, 1.40, 0.29, 0.31, 8),
    "b-running":  ("B", [], 4, 128, False, "running", None, None, None, None, 9),
}
#: name: (mean KL divergence, top-1 agreement %, task recovery % (lowest over tasks)) -- the verdict's
#: measures (0007), recorded as delta metrics; failed / running builds measured none.
VERDICT = {
    "a-4g128":    (0.020, 97.5, 98.0),
    "a-4g32":     (0.015, 98.0, 99.0),
    "a-3g128":    (0.060, 93.0, 95.0),
    "a-3g128-ao": (0.055, 93.5, 96.5),
    "a-2g64":     (0.200, 85.0, 90.0),
    "a-8g128":    (0.002, 99.5, 100.2),
    "b-4g128":    (0.030, 96.0, 97.0),
}


@dataclass
class Seeded:
    catalog: Catalog
    ids: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)

    def names(self, rows) -> list[str]:
        by_id = {v: k for k, v in self.ids.items()}
        return [by_id[r.id] for r in rows]


def _record_publications(catalog: Catalog, seeded: Seeded, name: str, run_id: str) -> None:
    manifest = (f"{len(seeded.manifests):x}" * 64)[:64]
    seeded.manifests[name] = manifest
    uri = f"file:///store/{name}/{run_id[:8]}"
    catalog.record_artifact(run_id=run_id, kind="gptq", uri=uri, manifest_sha256=manifest, size_bytes=1000)
    catalog.record_publication(run_id=run_id, publication=Publication(
        destination="file", uri=uri, manifest_sha256=manifest, size_bytes=1000))
    catalog.record_publication(run_id=run_id, publication=Publication(
        destination="hub", uri=f"https://huggingface.co/org/{name}/tree/gptq", manifest_sha256=manifest,
        size_bytes=1000, revision="gptq", commit="e" * 40))


def seed(catalog: Catalog) -> Seeded:
    """The builds of :data:`BUILDS`, with steps, metrics, gate, artifacts and publications."""
    seeded = Seeded(catalog)
    bases = {"A": (BASE_A, SHA_A), "B": (BASE_B, SHA_B)}
    adapters = {"X": (LORA_X, SHA_X), "Y": (LORA_Y, SHA_Y)}
    for name, (base, ads, bits, group, desc_act, status, ppl, speed, size, memory, day) in BUILDS.items():
        run_id = new_id()
        seeded.ids[name] = run_id
        spec = {"name": name, "quantize": {"bits": bits, "group_size": group, "desc_act": desc_act}}
        catalog.start_run(run_id=run_id, name=name, spec=spec, run_key=f"key-{name}")
        catalog.set_sources(run_id=run_id, base_uri=bases[base][0], base_sha=bases[base][1],
                            adapters=[{"uri": adapters[a][0], "sha": adapters[a][1], "weight": 1.0} for a in ads])
        catalog.record_step(run_id=run_id, name="download", status="ok", duration_s=1.0)
        if ppl is not None:
            _record_benchmark(catalog, run_id, ppl=ppl, speed=speed, size=size, memory=memory)
            kld, top1, recovery = VERDICT[name]
            catalog.record_metrics(run_id=run_id, metrics=[
                MetricRecord("kld_mean", "delta", kld, "nats"),
                MetricRecord("top1_agreement_pct", "delta", top1, "%"),
                MetricRecord("task_recovery_pct", "delta", recovery, "%"),
                MetricRecord("task_recovery_pct_piqa", "delta", recovery, "%"),
                MetricRecord("task_piqa_acc", "fp16", 0.6, ""),
                MetricRecord("task_piqa_acc", "gptq", 0.6 * recovery / 100, ""),
            ])
        if status == "passed":
            _record_publications(catalog, seeded, name, run_id)
        if status != "running":
            catalog.finish_run(run_id=run_id, status=status, error="boom" if status == "failed" else None)
        started = datetime(2026, 1, day, 12, 0, tzinfo=UTC)
        with catalog.engine.begin() as conn:
            conn.execute(text("UPDATE runs SET started_at = :t WHERE id = :id"), {"t": started, "id": run_id})
    return seeded


def _record_benchmark(catalog: Catalog, run_id: str, *, ppl: float, speed: float, size: float,
                      memory: float) -> None:
    """Both sides' metrics, the deltas and the perplexity gate check of one seeded build."""
    fp16_ppl, fp16_tok = 10.0, 100.0
    catalog.record_metrics(run_id=run_id, metrics=[
        MetricRecord("perplexity", "fp16", fp16_ppl, "ppl"),
        MetricRecord("perplexity", "gptq", fp16_ppl * (1 + ppl / 100), "ppl"),
        MetricRecord("decode_tok_s", "fp16", fp16_tok, "tok/s"),
        MetricRecord("decode_tok_s", "gptq", fp16_tok * speed, "tok/s"),
        MetricRecord("ppl_increase_pct", "delta", ppl, "%"),
        MetricRecord("decode_speedup", "delta", speed, "x"),
        MetricRecord("size_ratio", "delta", size, "x"),
        MetricRecord("memory_ratio", "delta", memory, "x"),
    ])
    catalog.record_gate(run_id=run_id, checks=[GateCheck(
        metric="max_ppl_increase_pct", threshold=5.0, baseline=fp16_ppl, candidate=fp16_ppl * (1 + ppl / 100),
        observed=ppl, passed=ppl <= 5.0, message=f"ppl +{ppl}%")])


def latest_run(catalog: Catalog | None = None):
    """The newest run of *catalog* (default: the settings' catalog, the test module's own) in detail."""
    from modelfactory.catalog import open_catalog

    with open_catalog() if catalog is None else nullcontext(catalog) as cat:
        (run,) = cat.list_runs(limit=1)
        return cat.get_run(run.id)


def catalog_cli() -> Callable[..., str]:
    """``invoke(*args, code=0)``: ``modelfactory catalog ARGS`` in process (CliRunner), its output; asserts the
    exit code is *code* and that an error is a message and an exit code, never a traceback (an uncaught exception)."""
    from typer.testing import CliRunner

    from modelfactory.interfaces.cli.main import app

    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["catalog", *args])
        assert result.exit_code == code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.output

    return invoke
