"""Catalog query latency at scale: seed N runs (default 100,000) with realistic child rows, then
report p50/p95 of ``catalog ls`` (several filter shapes), ``show``, ``best``, ``compare``,
``lineage`` and their JSON API equivalents (HTTP through FastAPI's TestClient), on SQLite and
PostgreSQL. Not a test: a measurement whose numbers go to ``bench/results/catalog-*.json``.

    .venv/bin/python bench/catalog_bench.py --runs 100000 --out bench/results/catalog-100k.json

PostgreSQL: ``--pg-url`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``); the
benchmark creates its own schema there and drops it afterwards. Seeding uses bulk inserts
(``executemany`` on SQLite, ``COPY`` on PostgreSQL), then ``ANALYZE`` (SQLite) / ``VACUUM ANALYZE``
(PostgreSQL: what autovacuum does to a table after bulk inserts -- it sets the visibility map that
index-only scans need; the test server runs with autovacuum off, so the benchmark does it itself).

The report records the load average around each backend (the numbers are only comparable on a
quiet machine) and, for every query, the plan of one call (``EXPLAIN QUERY PLAN`` on SQLite,
``EXPLAIN`` on PostgreSQL) of each statement it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import event, text  # noqa: E402

from modelfactory.catalog import Catalog, open_catalog  # noqa: E402
from modelfactory.catalog.models import Base  # noqa: E402
from modelfactory.catalog.queries import (  # noqa: E402
    RunFilter,
    best_build,
    compare_runs,
    lineage,
    query_runs,
)
from modelfactory.testing.catalog import PG_URL, postgres_schema_url  # noqa: E402

TARGET_P95_MS = 50.0
SIDE_METRICS = {"perplexity": "ppl", "decode_tok_s": "tok/s", "ttft_ms": "ms", "disk_bytes": "B", "load_s": "s",
                "mem_after_load_bytes": "B", "mem_peak_decode_bytes": "B", "mem_peak_bytes": "B"}
DELTAS = {"ppl_increase_pct": "%", "decode_speedup": "x", "size_ratio": "x", "memory_ratio": "x"}
VERDICT = {"kld_mean": "nats", "top1_agreement_pct": "%", "task_recovery_pct": "%"}
GATE = ("max_ppl_increase_pct", "min_decode_speedup", "max_size_ratio", "max_memory_ratio")
STEPS = ("download", "merge", "quantize", "benchmark", "gate", "publish")
CONFIGS = [(bits, group, desc) for bits in (2, 3, 4, 8) for group in (32, 64, 128, -1) for desc in (False, True)]
N_BASES, SHAS_PER_BASE, N_ADAPTERS = 10, 2, 40


# --------------------------------------------------------------------------- seeding


def generate(n_runs: int, seed: int = 0) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Rows for every table, plus the values the query mix samples from."""
    rng = random.Random(seed)
    # the verdict's measures (0007) from their own generator: every other value is what it was before
    verdict_rng = random.Random(seed + 1)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    bases = [{"id": i + 1, "uri": f"org/base-{i // SHAS_PER_BASE}", "sha": f"{i + 1:040x}", "first_seen": t0}
             for i in range(N_BASES * SHAS_PER_BASE)]
    adapters = [{"id": i + 1, "uri": f"team/lora-{i}", "sha": f"{0xada000 + i:040x}", "first_seen": t0}
                for i in range(N_ADAPTERS)]
    tables: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "base_models", "adapters", "runs", "run_adapters", "steps", "metrics", "gate_checks", "artifacts",
        "publications")}
    tables["base_models"], tables["adapters"] = bases, adapters
    ids, manifests = [], []
    for n in range(n_runs):
        run_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        ids.append(run_id)
        base = rng.choice(bases)
        chosen = rng.sample(adapters, rng.choice((0, 1, 1, 1, 2)))
        bits, group, desc = rng.choice(CONFIGS)
        status = rng.choices(("passed", "rejected", "failed", "running"), (60, 25, 12, 3))[0]
        started = t0 + timedelta(seconds=n * 300 + rng.randint(0, 200))  # ~1 year of runs, in order
        finished = started + timedelta(seconds=rng.randint(60, 3600)) if status != "running" else None
        label = f"gptq-{bits}bit-{'nogroup' if group == -1 else f'{group}g'}" + ("-actorder" if desc else "")
        spec = {"name": f"build-{n}", "base": {"uri": base["uri"]}, "adapters": [{"uri": a["uri"]} for a in chosen],
                "quantize": {"bits": bits, "group_size": group, "desc_act": desc}}
        measured = status in ("passed", "rejected")
        ratios = {
            "ppl_increase_pct": rng.uniform(0.05, 4.0) * (5 - bits / 2) / 3,
            "decode_speedup": rng.uniform(0.9, 2.4) * (1.2 if bits <= 4 else 0.8),
            "size_ratio": bits / 16 + rng.uniform(0.01, 0.08),
            "memory_ratio": bits / 16 + rng.uniform(0.03, 0.1),
        } if measured else {k: None for k in DELTAS}
        loss = (9 - bits) / 2  # fewer bits, further from fp16
        verdict = {
            "kld_mean": verdict_rng.uniform(0.001, 0.05) * loss,
            "top1_agreement_pct": 100 - verdict_rng.uniform(0.5, 4.0) * loss,
            "task_recovery_pct": 100 - verdict_rng.uniform(0.0, 3.0) * loss,
        } if measured else {k: None for k in VERDICT}
        tables["runs"].append({
            "id": run_id, "flow_run_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "name": f"build-{n}",
            "status": status, "run_key": f"{rng.getrandbits(64):016x}", "spec": spec, "base_uri": base["uri"],
            "base_sha": base["sha"], "adapters": [{"uri": a["uri"], "sha": a["sha"], "weight": 1.0} for a in chosen],
            "library_versions": {"torch": "2.13.0", "gptqmodel": "7.6.0"}, "host": {"hostname": f"gpu-{n % 16}"},
            "started_at": started, "finished_at": finished, "error_kind": "quantization" if status == "failed" else None,
            "error": "GPTQModel failed: out of memory" if status == "failed" else None, "config": label,
            "bits": bits, "group_size": group, "desc_act": desc, "base_model_id": base["id"], **ratios, **verdict,
        })
        for position, adapter in enumerate(chosen):
            tables["run_adapters"].append({"run_id": run_id, "position": position, "adapter_id": adapter["id"],
                                           "weight": 1.0})
        steps = STEPS if status == "passed" else STEPS[:5] if measured else STEPS[:rng.randint(1, 3)]
        for step in steps:
            tables["steps"].append({"run_id": run_id, "name": step, "status": rng.choice(("ok", "ok", "reused")),
                                    "duration_s": rng.uniform(0.1, 300), "output_uri": f"file:///work/{step}/{n}",
                                    "detail": {"n": n}, "recorded_at": started})
        if measured:
            for side in ("fp16", "gptq"):
                for name, unit in SIDE_METRICS.items():
                    tables["metrics"].append({"run_id": run_id, "name": name, "side": side,
                                              "value": rng.uniform(1, 1e9), "unit": unit})
            for name, unit in DELTAS.items():
                tables["metrics"].append({"run_id": run_id, "name": name, "side": "delta", "value": ratios[name],
                                          "unit": unit})
            for name, unit in VERDICT.items():
                tables["metrics"].append({"run_id": run_id, "name": name, "side": "delta", "value": verdict[name],
                                          "unit": unit})
            tables["metrics"].append({"run_id": run_id, "name": "quantize_s", "side": "gptq",
                                      "value": rng.uniform(10, 400), "unit": "s"})
            tables["metrics"].append({"run_id": run_id, "name": "merge_max_abs_logit_diff", "side": "",
                                      "value": rng.uniform(0, 1e-3), "unit": "logit"})
            for check in GATE:
                tables["gate_checks"].append({"run_id": run_id, "metric": check, "threshold": 1.0, "baseline": 1.0,
                                              "candidate": 1.0, "observed": 1.0, "passed": status == "passed",
                                              "message": f"{check} ok"})
        if status == "passed":
            manifest = f"{rng.getrandbits(256):064x}"
            manifests.append(manifest)
            uri = f"s3://models/{base['uri']}/{label}/{manifest[:16]}"
            tables["artifacts"].append({"run_id": run_id, "kind": "gptq", "uri": uri, "manifest_sha256": manifest,
                                        "size_bytes": 4 << 30, "created_at": finished})
            tables["publications"].append({"run_id": run_id, "destination": "s3", "uri": uri, "revision": None,
                                           "commit_sha": None, "manifest_sha256": manifest, "size_bytes": 4 << 30,
                                           "reused": False, "published_at": finished})
            if rng.random() < 0.5:
                tables["publications"].append({
                    "run_id": run_id, "destination": "hub", "uri": f"https://huggingface.co/{base['uri']}-gptq/tree/{label}",
                    "revision": label, "commit_sha": f"{rng.getrandbits(160):040x}", "manifest_sha256": manifest,
                    "size_bytes": 4 << 30, "reused": False, "published_at": finished})
    sample = {"ids": ids, "manifests": manifests, "bases": sorted({b["uri"] for b in bases}),
              "base_shas": [b["sha"] for b in bases], "adapters": [a["uri"] for a in adapters], "t0": t0,
              "t_end": t0 + timedelta(seconds=n_runs * 300)}
    return tables, sample


ORDER = ("base_models", "adapters", "runs", "run_adapters", "steps", "metrics", "gate_checks", "artifacts",
         "publications")
JSON_COLUMNS = {"spec", "adapters", "library_versions", "host", "detail"}


def load(catalog: Catalog, tables: dict[str, list[dict[str, Any]]]) -> None:
    """Bulk-load *tables* (executemany on SQLite, COPY on PostgreSQL), then ANALYZE."""
    engine = catalog.engine
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                for name in ORDER:
                    rows = tables[name]
                    columns = list(rows[0])
                    with cursor.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row([json.dumps(row[c]) if c in JSON_COLUMNS and row[c] is not None
                                            else row[c] for c in columns])
                for name in ("base_models", "adapters"):
                    cursor.execute(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))")
            raw.commit()
            raw.driver_connection.autocommit = True  # VACUUM runs outside a transaction
            with raw.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE")
            raw.driver_connection.autocommit = False
        finally:
            raw.close()
        return
    with engine.connect() as conn:
        for name in ORDER:
            table = Base.metadata.tables[name]
            rows = tables[name]
            with conn.begin():
                for start in range(0, len(rows), 20_000):
                    conn.execute(table.insert(), rows[start:start + 20_000])
        with conn.begin():  # committed: outside a transaction block SQLAlchemy 2 rolls ANALYZE back
            conn.exec_driver_sql("ANALYZE")
        assert conn.exec_driver_sql("SELECT count(*) FROM sqlite_stat1").scalar(), "ANALYZE left no statistics"


# --------------------------------------------------------------------------- measuring


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 2), "p95_ms": round(q[94], 2), "max_ms": round(ordered[-1], 2),
            "n": len(ordered)}


def measure(fn: Callable[[random.Random], Any], iterations: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    for _ in range(5):  # warm caches and the connection pool
        fn(rng)
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn(rng)
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (how busy the machine was)."""
    return [round(x, 2) for x in os.getloadavg()]


def explain(engine: Any, fn: Callable[[random.Random], Any]) -> list[dict[str, Any]]:
    """The plan of every SELECT that one call of *fn* runs."""
    captured: list[tuple[str, Any]] = []

    def grab(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "(SELECT", "WITH")):
            captured.append((statement, params))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        fn(random.Random(7))
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    plans = []
    with engine.connect() as conn:
        for statement, params in captured:
            if engine.dialect.name == "sqlite":
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
                plan = [row[3] for row in rows]
            else:
                rows = conn.exec_driver_sql("EXPLAIN (COSTS OFF) " + statement, params).all()
                plan = [row[0] for row in rows]
            plans.append({"sql": " ".join(statement.split())[:300], "plan": plan})
    return plans


def query_mix(catalog: Catalog, sample: dict[str, Any]) -> dict[str, Callable[[random.Random], Any]]:
    """name -> one call with random parameters (what people type)."""
    ids, bases, shas, adapters = sample["ids"], sample["bases"], sample["base_shas"], sample["adapters"]

    def window(rng: random.Random) -> tuple[datetime, datetime]:
        start = sample["t0"] + (sample["t_end"] - sample["t0"]) * rng.random() * 0.9
        return start, start + timedelta(days=30)

    def ls(**kw: Any) -> Callable[[random.Random], Any]:
        def run(rng: random.Random) -> Any:
            args = {k: (v(rng) if callable(v) else v) for k, v in kw.items()}
            sort = args.pop("sort", "newest")
            rows = query_runs(catalog, filters=RunFilter(**args), sort=sort, limit=50)
            return rows
        return run

    def ls_window(rng: random.Random) -> Any:
        since, until = window(rng)
        return query_runs(catalog, filters=RunFilter(base=rng.choice(bases), since=since, until=until), limit=50)

    return {
        "ls (newest 50)": ls(),
        "ls --status passed": ls(status="passed"),
        "ls --base --status passed --bits 4": ls(base=lambda r: r.choice(bases), status="passed", bits=4),
        "ls --base SHA --config": ls(base=lambda r: r.choice(shas)[:12], config="gptq-4bit-128g"),
        "ls --adapter": ls(adapter=lambda r: r.choice(adapters)),
        "ls --base --since --until (30 days)": ls_window,
        "ls --base --sort speed": ls(base=lambda r: r.choice(bases), sort="speed"),
        "ls --status passed --sort ppl": ls(status="passed", sort="ppl"),
        "show": lambda r: catalog.get_run(r.choice(ids)),
        "show (8-char prefix)": lambda r: catalog.get_run(r.choice(ids)[:8]),
        "best --max-ppl-increase 3% --by speed": lambda r: best_build(
            catalog, base=r.choice(bases), max_ppl_increase_pct=3.0, by="speed"),
        "best --by size": lambda r: best_build(catalog, base=r.choice(bases), by="size"),
        "ls --status passed --sort kld": ls(status="passed", sort="kld"),
        "ls --base --max-kld 0.05 --sort recovery": ls(base=lambda r: r.choice(bases), max_kld=0.05, sort="recovery"),
        "best --min-task-recovery 97% --max-kld 0.05": lambda r: best_build(
            catalog, base=r.choice(bases), by="speed", filters=RunFilter(min_task_recovery=97.0, max_kld=0.05)),
        "compare (3 runs)": lambda r: compare_runs(catalog, run_ids=r.sample(ids, 3)),
        "lineage (manifest sha)": lambda r: lineage(catalog, ref=r.choice(sample["manifests"])),
    }


def api_mix(client: Any, sample: dict[str, Any]) -> dict[str, Callable[[random.Random], Any]]:
    def get(path: str, params: Callable[[random.Random], dict] | None = None) -> Callable[[random.Random], Any]:
        def run(rng: random.Random) -> Any:
            response = client.get(path if not callable(path) else path(rng), params=params(rng) if params else None)
            assert response.status_code == 200, response.text
            return response
        return run

    bases, ids = sample["bases"], sample["ids"]
    return {
        "GET /api/runs?status=passed": get("/api/runs", lambda r: {"status": "passed"}),
        "GET /api/runs?base&status&bits": get("/api/runs", lambda r: {"base": r.choice(bases), "status": "passed",
                                                                      "bits": 4}),
        "GET /api/runs?adapter": get("/api/runs", lambda r: {"adapter": r.choice(sample["adapters"])}),
        "GET /api/runs/{id}": get(lambda r: f"/api/runs/{r.choice(ids)}"),  # type: ignore[arg-type]
        "GET /api/best?max_ppl_increase=3%": get("/api/best", lambda r: {"base": r.choice(bases),
                                                                         "max_ppl_increase": "3%"}),
        "GET /api/best?min_task_recovery=97%&max_kld=0.05": get("/api/best", lambda r: {
            "base": r.choice(bases), "min_task_recovery": "97%", "max_kld": "0.05"}),
        "GET /api/lineage/{manifest}": get(lambda r: f"/api/lineage/{r.choice(sample['manifests'])}"),  # type: ignore
    }


# --------------------------------------------------------------------------- backends


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="catalog-bench-") as folder:
        yield f"sqlite:///{folder}/catalog.db"


def bench_backend(url: str, tables: dict[str, list[dict[str, Any]]], sample: dict[str, Any],
                  iterations: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from modelfactory.interfaces.server import create_app
    from modelfactory.testing.server import catalog_app_env

    catalog = open_catalog(url)
    started = time.perf_counter()
    load(catalog, tables)
    seed_s = time.perf_counter() - started
    with catalog.engine.connect() as conn:
        counts = {name: conn.execute(text(f"SELECT count(*) FROM {name}")).scalar() for name in ORDER}
        version = conn.execute(text("SELECT sqlite_version()" if url.startswith("sqlite") else "SHOW server_version")
                               ).scalar()
    results: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    load_before = load_average()
    for name, fn in query_mix(catalog, sample).items():
        results[name] = measure(fn, iterations)
        plans[name] = explain(catalog.engine, fn)
        print(f"  {name:42s} p50 {results[name]['p50_ms']:7.2f} ms  p95 {results[name]['p95_ms']:7.2f} ms", flush=True)
    with catalog_app_env(url), TestClient(create_app()) as client:
        for name, fn in api_mix(client, sample).items():
            results[name] = measure(fn, iterations)
            print(f"  {name:42s} p50 {results[name]['p50_ms']:7.2f} ms  p95 {results[name]['p95_ms']:7.2f} ms",
                  flush=True)
    load_after = load_average()
    catalog.dispose()
    print(f"  load average before {load_before}, after {load_after}", flush=True)
    return {"server_version": version, "seed_s": round(seed_s, 1), "rows": counts,
            "load_average_1_5_15_min": {"before": load_before, "after": load_after}, "queries": results,
            "all_p95_within_target": all(r["p95_ms"] <= TARGET_P95_MS for r in results.values()),
            "plans": plans}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    tables, sample = generate(args.runs)
    print(f"generated {sum(len(v) for v in tables.values()):,} rows for {args.runs:,} runs "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    report: dict[str, Any] = {
        "command": "python bench/catalog_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": args.runs, "iterations": args.iterations, "target_p95_ms": TARGET_P95_MS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1_5_15_min_at_start": load_average()},
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "backends": {},
    }
    for backend in args.backends.split(","):
        print(f"{backend}:", flush=True)
        context = sqlite_url() if backend == "sqlite" else postgres_schema_url(args.pg_url, prefix="mf_bench")
        with context as url:
            report["backends"][backend] = bench_backend(url, tables, sample, args.iterations)
        print(f"  seeded in {report['backends'][backend]['seed_s']} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(b["all_p95_within_target"] for b in report["backends"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
