"""The catalog queries (ls filters and sorts, compare, best / Pareto, lineage, leaderboard) and
their renderings, on SQLite and PostgreSQL (the ``catalog`` fixture of conftest.py).

:func:`modelfactory.testing.catalog.seed` builds a small catalog whose expected answers are worked
out by hand below; the API, CLI and page tests reuse it.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime

import pytest
from rich.console import Console
from sqlalchemy import text

from modelfactory.catalog import (
    Catalog,
    MetricRecord,
    open_catalog,
)
from modelfactory.catalog.queries import (
    RunFilter,
    best_build,
    compare_runs,
    leaderboard,
    lineage,
    no_best_message,
    parse_percent,
    parse_when,
    query_runs,
    verdict_bounds,
)
from modelfactory.core.errors import CatalogNotFoundError, CatalogQueryError
from modelfactory.core.records import Publication
from modelfactory.interfaces.cli.render import (
    best_csv,
    best_table,
    comparison_csv,
    comparison_table,
    detail_csv,
    lineage_csv,
    lineage_table,
    record_json,
    rows_csv,
    rows_table,
)
from modelfactory.reports import run_markdown
from modelfactory.testing.catalog import (
    BASE_A,
    BASE_B,
    LORA_X,
    LORA_Y,
    SHA_A,
    SHA_B,
    SHA_X,
    SHA_Y,
    Seeded,
    at_revision,
    seed,
)


@pytest.fixture
def seeded(catalog: Catalog) -> Seeded:
    return seed(catalog)


def ls(seeded: Seeded, sort: str = "newest", limit: int = 50, **filters) -> list[str]:
    return seeded.names(query_runs(seeded.catalog, filters=RunFilter(**filters), sort=sort, limit=limit))


# --------------------------------------------------------------------------- ls


def test_ls_filters(seeded: Seeded) -> None:
    all_a = ["a-failed", "a-8g128", "a-2g64", "a-3g128-ao", "a-3g128", "a-4g32", "a-4g128"]
    assert ls(seeded) == ["b-running", "b-4g128", *all_a]  # newest first
    assert ls(seeded, base=BASE_A) == all_a
    assert ls(seeded, base=SHA_A) == ls(seeded, base=SHA_A[:7]) == all_a  # SHA or a 7+ prefix
    assert ls(seeded, base=SHA_A[:6]) == []  # too short a prefix matches nothing
    assert ls(seeded, base="org/unknown") == []
    assert ls(seeded, adapter=LORA_Y) == ["b-4g128", "a-2g64", "a-3g128-ao"]
    assert ls(seeded, adapter=SHA_Y[:10], base=BASE_A) == ["a-2g64", "a-3g128-ao"]
    assert ls(seeded, status="passed", base=BASE_A) == ["a-8g128", "a-3g128-ao", "a-3g128", "a-4g32", "a-4g128"]
    assert ls(seeded, bits=3) == ["a-3g128-ao", "a-3g128"]
    assert ls(seeded, bits=4, group_size=128, status="passed") == ["b-4g128", "a-4g128"]
    assert ls(seeded, desc_act=True) == ["a-3g128-ao"]
    assert ls(seeded, config="gptq-3bit-128g-actorder") == ["a-3g128-ao"]
    assert ls(seeded, config="gptq-4bit-32g") == ["a-4g32"]
    assert ls(seeded, since=parse_when("2026-01-03"), until=parse_when("2026-01-05", end=True)) == [
        "a-2g64", "a-3g128-ao", "a-3g128"]  # since inclusive, a bare-date until covers that day
    assert ls(seeded, until=parse_when("2026-01-02T00:00:00Z")) == ["a-4g128"]
    assert ls(seeded, limit=2) == ["b-running", "b-4g128"]


def test_ls_sorts_with_missing_values_last(seeded: Seeded) -> None:
    assert ls(seeded, "oldest", limit=3) == ["a-4g128", "a-4g32", "a-3g128"]
    assert ls(seeded, "speed")[:3] == ["a-2g64", "a-3g128", "a-3g128-ao"]
    assert ls(seeded, "speed")[-2:] == ["b-running", "a-failed"]  # no ratios: last, newest first
    assert ls(seeded, "ppl", base=BASE_A)[:3] == ["a-8g128", "a-4g32", "a-4g128"]
    assert ls(seeded, "size", status="passed")[:1] == ["a-3g128-ao"]  # tie with a-3g128: newest first
    assert ls(seeded, "memory", status="passed")[-1] == "a-8g128"
    assert ls(seeded, "name", limit=2) == ["a-2g64", "a-3g128"]


def test_ls_rows_carry_config_sources_and_ratios(seeded: Seeded) -> None:
    (row,) = query_runs(seeded.catalog, filters=RunFilter(config="gptq-3bit-128g-actorder"))
    assert (row.bits, row.group_size, row.desc_act, row.config) == (3, 128, True, "gptq-3bit-128g-actorder")
    assert (row.base_uri, row.base_sha) == (BASE_A, SHA_A)
    assert [a["uri"] for a in row.adapters] == [LORA_X, LORA_Y]
    assert (row.ppl_increase_pct, row.decode_speedup, row.size_ratio, row.memory_ratio) == (2.5, 1.55, 0.24, 0.27)
    assert row.started_at == datetime(2026, 1, 4, 12, tzinfo=UTC)
    assert json.loads(record_json([row]))[0]["adapters"][1]["sha"] == SHA_Y


def test_ls_rejects_bad_input(seeded: Seeded) -> None:
    with pytest.raises(CatalogQueryError, match="run status 'done' is not one of"):
        RunFilter(status="done")
    with pytest.raises(CatalogQueryError, match="sort key 'fastest' is not one of newest, oldest"):
        query_runs(seeded.catalog, sort="fastest")
    with pytest.raises(CatalogQueryError, match="give a limit from 1 to"):
        query_runs(seeded.catalog, limit=0)
    with pytest.raises(CatalogQueryError, match="is empty: give a 'since' before 'until'"):
        RunFilter(since=parse_when("2026-02-01"), until=parse_when("2026-01-01"))
    with pytest.raises(CatalogQueryError, match="'yesterday' is not an ISO date"):
        parse_when("yesterday")
    assert parse_percent("3%") == parse_percent(" 3 ") == parse_percent(3) == 3.0
    with pytest.raises(CatalogQueryError, match="'three' is not a percentage"):
        parse_percent("three")
    with pytest.raises(CatalogQueryError, match=">= 0"):
        parse_percent("-1%")


def test_ratio_columns_follow_delta_metrics(catalog: Catalog) -> None:  # noqa: F811
    run_id = str(uuid.uuid4())
    catalog.start_run(run_id=run_id, name="r", spec={}, run_key="k")
    catalog.record_metrics(run_id=run_id, metrics=[MetricRecord("decode_speedup", "delta", 1.1, "x"),
                                                   MetricRecord("decode_speedup", "gptq", 9.0, "x")])
    catalog.record_metrics(run_id=run_id, metrics=[MetricRecord("decode_speedup", "delta", 1.7, "x"),
                                                   MetricRecord("size_ratio", "delta", 0.3, "x")])
    (row,) = query_runs(catalog)
    assert (row.decode_speedup, row.size_ratio, row.ppl_increase_pct) == (1.7, 0.3, None)


def _add_build(catalog: Catalog, name: str, *, base: tuple[str, str], status: str, day: int, hour: int = 12,
               ratios: tuple[float, float, float, float] | None = None, bits: int = 4) -> str:
    """One more run (no artifacts) for the order/front checks below."""
    run_id = str(uuid.uuid4())
    catalog.start_run(run_id=run_id, name=name, spec={"quantize": {"bits": bits, "group_size": 128}},
                      run_key=f"key-{name}")
    catalog.set_sources(run_id=run_id, base_uri=base[0], base_sha=base[1], adapters=[])
    if ratios is not None:
        catalog.record_metrics(run_id=run_id, metrics=[
            MetricRecord(metric, "delta", value, "x") for metric, value in zip(
                ("ppl_increase_pct", "decode_speedup", "size_ratio", "memory_ratio"), ratios)])
    if status != "running":
        catalog.finish_run(run_id=run_id, status=status)
    with catalog.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET started_at = :t WHERE id = :id"),
                     {"t": datetime(2026, 1, day, hour, 0, tzinfo=UTC), "id": run_id})
    return run_id


SHA_A2 = "a9" * 20  # a second commit of BASE_A: a base URI then matches two base model versions


@pytest.fixture
def two_versions(seeded: Seeded) -> Seeded:
    """The seeded builds plus builds of a second SHA of BASE_A: ties with version 1, missing ratios,
    equal starts (then the id decides)."""
    more = {
        "a2-fast":    ("passed", 10, 12, (2.0, 1.60, 0.24, 0.27)),   # ties a-3g128 on speed and size
        "a2-slow":    ("passed", 11, 12, (0.5, 1.05, 0.50, 0.52)),
        "a2-rej":     ("rejected", 12, 12, (7.0, 2.30, 0.14, 0.18)),
        "a2-failed":  ("failed", 13, 12, None),
        "a2-failed2": ("failed", 13, 12, None),                       # same start as a2-failed
        "a2-run":     ("running", 14, 12, None),
        "a2-same":    ("passed", 15, 12, (2.0, 1.60, 0.24, 0.27)),    # an equal point, newer
    }
    for name, (status, day, hour, ratios) in more.items():
        two_versions_id = _add_build(seeded.catalog, name, base=(BASE_A, SHA_A2), status=status, day=day,
                                     hour=hour, ratios=ratios)
        seeded.ids[name] = two_versions_id
    return seeded


def _expected_order(rows, sort: str) -> list[str]:
    """The documented ls order, worked out in Python: the key in its direction, missing values last,
    ties newest first, then by id descending."""
    key_name, direction = {"ppl": ("ppl_increase_pct", 1), "speed": ("decode_speedup", -1),
                           "size": ("size_ratio", 1), "memory": ("memory_ratio", 1), "name": ("name", 1),
                           "kld": ("kld_mean", 1), "top1": ("top1_agreement_pct", -1),
                           "recovery": ("task_recovery_pct", -1),
                           "newest": ("started_at", -1), "oldest": ("started_at", 1)}[sort]
    ordered = sorted(rows, key=lambda r: r.id, reverse=True)
    ordered.sort(key=lambda r: r.started_at, reverse=True)
    present = [r for r in ordered if getattr(r, key_name) is not None]
    present.sort(key=lambda r: getattr(r, key_name), reverse=direction < 0)
    return [r.id for r in present] + [r.id for r in ordered if getattr(r, key_name) is None]


@pytest.mark.parametrize("sort", ["ppl", "speed", "size", "memory", "kld", "top1", "recovery", "newest", "oldest",
                                  "name"])
def test_ls_sort_orders_across_base_versions_and_missing_values(two_versions: Seeded, sort: str) -> None:
    """Ratio sorts read runs with the value, then those without (0004); a base matching several
    versions is merged from one ordered read per version: same order as one big sort, at every limit."""
    cat = two_versions.catalog
    for filters in (RunFilter(base=BASE_A), RunFilter(), RunFilter(status="passed"), RunFilter(base=SHA_A2),
                    RunFilter(base=BASE_A, status="failed"), RunFilter(base=BASE_A, bits=4),
                    RunFilter(base=BASE_A, max_kld=0.1), RunFilter(status="passed", min_task_recovery=96.5)):
        everything = query_runs(cat, filters=filters, sort="newest", limit=1000)
        expected = _expected_order(everything, sort)
        for limit in range(1, len(expected) + 2):
            got = [r.id for r in query_runs(cat, filters=filters, sort=sort, limit=limit)]
            assert got == expected[:limit], (filters, limit)


def test_best_with_verdict_bounds_matches_brute_force(two_versions: Seeded) -> None:
    """best's candidates meet the verdict bounds too (index-only: ix_runs_best carries the columns)."""
    cat = two_versions.catalog
    for bounds in ({"max_kld": 0.05}, {"min_top1": 95.0}, {"min_task_recovery": 97.0},
                   {"max_kld": 0.05, "min_task_recovery": 97.0, "min_top1": 98.0}, {"max_kld": 0.001}):
        for by in ("speed", "size"):
            found = best_build(cat, base=BASE_A, by=by, filters=RunFilter(**bounds))
            rows = [r for r in query_runs(cat, filters=RunFilter(base=BASE_A, status="passed", **bounds), limit=1000)
                    if r.ppl_increase_pct is not None]
            assert found.candidates == len(rows) and found.bounds == bounds
            assert [r.id for r in found.front] == _brute_front(rows, by), (bounds, by)


def _brute_front(rows, by: str) -> list[str]:
    """The Pareto front as docs/catalog.md defines it, by brute force over candidate rows."""
    attr, higher = {"speed": ("decode_speedup", True), "size": ("size_ratio", False),
                    "memory": ("memory_ratio", False)}[by]
    sign = 1 if higher else -1
    ordered = sorted(rows, key=lambda r: r.id, reverse=True)
    ordered.sort(key=lambda r: r.started_at, reverse=True)
    ordered.sort(key=lambda r: (r.ppl_increase_pct, -sign * getattr(r, attr)))
    front, best = [], None
    for r in ordered:
        value = sign * getattr(r, attr)
        if best is None or value > best:
            front.append(r.id)
            best = value
    return front


@pytest.mark.parametrize("by", ["speed", "size", "memory"])
def test_best_front_across_base_versions_matches_brute_force(two_versions: Seeded, by: str) -> None:
    """0004 computes the front in SQL (a running MAX/MIN window): same front, best and candidate
    count as the definition, with equal points (the newest is kept) and two versions of the base."""
    cat = two_versions.catalog
    for limit in (None, 0.5, 1.0, 2.0, 2.5, 3.0, 100.0):
        found = best_build(cat, base=BASE_A, max_ppl_increase_pct=limit, by=by)
        rows = [r for r in query_runs(cat, filters=RunFilter(base=BASE_A, status="passed"), limit=1000)
                if r.ppl_increase_pct is not None and (limit is None or r.ppl_increase_pct <= limit)]
        assert found.candidates == len(rows)
        assert [r.id for r in found.front] == _brute_front(rows, by), limit
        assert (found.best.id if found.best else None) == (_brute_front(rows, by) or [None])[-1]
    # a2-same and a2-fast equal a-3g128 (ppl 2.0 vs 2.5 aside): the newest equal point is on the front
    front = two_versions.names(best_build(cat, base=BASE_A, by="speed").front)
    assert "a2-same" in front and "a2-fast" not in front
    assert two_versions.names([best_build(cat, base=SHA_A2, by="speed").best]) == ["a2-same"]


# --------------------------------------------------------------------------- best


def test_best_is_the_pareto_front_point_with_the_best_objective(seeded: Seeded) -> None:
    best = best_build(seeded.catalog, base=BASE_A, max_ppl_increase_pct="3%", by="speed")
    # candidates: passed builds of A within 3%: a-8g128, a-4g32, a-4g128, a-3g128, a-3g128-ao (a-2g64 rejected)
    assert best.candidates == 5
    assert seeded.names(best.front) == ["a-8g128", "a-4g32", "a-4g128", "a-3g128"]  # a-3g128-ao is dominated
    assert seeded.names([best.best]) == ["a-3g128"]
    tighter = best_build(seeded.catalog, base=SHA_A, max_ppl_increase_pct=1.0, by="speed")
    assert seeded.names([tighter.best]) == ["a-4g128"] and tighter.candidates == 3
    by_size = best_build(seeded.catalog, base=BASE_A, by="size")
    # equal size/ppl: a-3g128-ao (newer) is kept, a-3g128 drops out as a duplicate point
    assert seeded.names(by_size.front) == ["a-8g128", "a-4g32", "a-4g128", "a-3g128-ao"]
    assert seeded.names([by_size.best]) == ["a-3g128-ao"]
    by_memory = best_build(seeded.catalog, base=BASE_A, max_ppl_increase_pct=0.9, by="memory")
    assert seeded.names(by_memory.front) == ["a-8g128", "a-4g32"] and seeded.names([by_memory.best]) == ["a-4g32"]
    only_y = best_build(seeded.catalog, base=BASE_A, by="speed", filters=RunFilter(adapter=LORA_Y))
    assert seeded.names([only_y.best]) == ["a-3g128-ao"]  # the passing build that merged lora-y
    assert best_build(seeded.catalog, base=BASE_B, by="speed").best.name == "b-4g128"


def test_ls_and_best_filter_and_sort_on_the_verdict(seeded: Seeded) -> None:
    """KL divergence, top-1 agreement and task recovery (0007 columns, from the delta metrics): bounds
    are inclusive, runs that did not measure a bounded value are left out; sorts put them last."""
    assert ls(seeded, max_kld=0.05) == ["b-4g128", "a-8g128", "a-4g32", "a-4g128"]
    assert ls(seeded, min_top1=95, base=BASE_A) == ["a-8g128", "a-4g32", "a-4g128"]
    assert ls(seeded, min_task_recovery=97.0) == ["b-4g128", "a-8g128", "a-4g32", "a-4g128"]  # 97.0 is in
    assert ls(seeded, min_task_recovery=97.0, max_kld=0.02, status="passed") == ["a-8g128", "a-4g32", "a-4g128"]
    assert ls(seeded, "kld") == ["a-8g128", "a-4g32", "a-4g128", "b-4g128", "a-3g128-ao", "a-3g128", "a-2g64",
                                 "b-running", "a-failed"]
    assert ls(seeded, "top1", limit=3) == ["a-8g128", "a-4g32", "a-4g128"]
    assert ls(seeded, "recovery", base=BASE_A) == ["a-8g128", "a-4g32", "a-4g128", "a-3g128-ao", "a-3g128",
                                                   "a-2g64", "a-failed"]
    (row,) = query_runs(seeded.catalog, filters=RunFilter(config="gptq-3bit-128g-actorder"))
    assert (row.kld_mean, row.top1_agreement_pct, row.task_recovery_pct) == (0.055, 93.5, 96.5)

    unbounded = best_build(seeded.catalog, base=BASE_A, by="speed")
    assert seeded.names([unbounded.best]) == ["a-3g128"]  # the fastest: recovers 95 % of fp16's task score
    strict = best_build(seeded.catalog, base=BASE_A, by="speed",
                        filters=RunFilter(**verdict_bounds(min_task_recovery="97%", max_kld="0.05")))
    assert strict.candidates == 3 and seeded.names(strict.front) == ["a-8g128", "a-4g32", "a-4g128"]
    assert seeded.names([strict.best]) == ["a-4g128"] and strict.bounds == {"max_kld": 0.05, "min_task_recovery": 97.0}
    assert seeded.names([best_build(seeded.catalog, base=BASE_A, by="size",
                                    filters=RunFilter(min_top1=99)).best]) == ["a-8g128"]
    none = best_build(seeded.catalog, base=BASE_A, filters=RunFilter(max_kld=0.001))
    assert none.best is None and none.candidates == 0
    assert no_best_message(none, relax="--max-kld") == (
        "no passing build of 'org/llama-base' within a mean KL divergence <= 0.001 has speed measured: relax --max-kld")


def test_verdict_bounds_reject_bad_input() -> None:
    assert verdict_bounds(max_kld="0.05", min_top1="95%", min_task_recovery=" 97 % ") == {
        "max_kld": 0.05, "min_top1": 95.0, "min_task_recovery": 97.0}
    assert verdict_bounds() == {"max_kld": None, "min_top1": None, "min_task_recovery": None}
    with pytest.raises(CatalogQueryError, match="max KL divergence 'low' is not a number: give e.g. 0.05"):
        verdict_bounds(max_kld="low")
    with pytest.raises(CatalogQueryError, match="min task recovery '-1%' must be a percentage >= 0: give e.g. 97%"):
        verdict_bounds(min_task_recovery="-1%")
    with pytest.raises(CatalogQueryError, match="min top-1 agreement 'most' is not a percentage"):
        verdict_bounds(min_top1="most")
    with pytest.raises(CatalogQueryError, match="max KL divergence -0.1 must be a number >= 0"):
        RunFilter(max_kld=-0.1)


def test_best_without_candidates_or_base(seeded: Seeded) -> None:
    none = best_build(seeded.catalog, base=BASE_A, max_ppl_increase_pct=0.05)
    assert none.best is None and none.front == () and none.candidates == 0
    with pytest.raises(CatalogNotFoundError, match="was built on base model 'org/nothing'"):
        best_build(seeded.catalog, base="org/nothing")
    with pytest.raises(CatalogQueryError, match="objective 'ppl' is not one of speed, size, memory"):
        best_build(seeded.catalog, base=BASE_A, by="ppl")


# --------------------------------------------------------------------------- compare / lineage / leaderboard


def test_compare_runs_side_by_side_with_changes(seeded: Seeded) -> None:
    first, second = seeded.ids["a-4g128"], seeded.ids["a-3g128"]
    comparison = compare_runs(seeded.catalog, run_ids=[first[:8], second])
    assert [r.id for r in comparison.runs] == [first, second]
    metrics = {(m.name, m.side): m for m in comparison.metrics}
    speed = metrics[("decode_speedup", "delta")]
    assert speed.values == (1.3, 1.6) and speed.change_pct[0] is None
    assert speed.change_pct[1] == pytest.approx((1.6 / 1.3 - 1) * 100)
    failed = compare_runs(seeded.catalog, run_ids=[first, seeded.ids["a-failed"]])  # a run without metrics
    assert {m.values[1] for m in failed.metrics} == {None}
    with pytest.raises(CatalogQueryError, match="give 2 to 20 run ids"):
        compare_runs(seeded.catalog, run_ids=[first])
    with pytest.raises(CatalogQueryError, match="is given twice"):
        compare_runs(seeded.catalog, run_ids=[first, first[:8]])
    with pytest.raises(CatalogNotFoundError, match="no run with id 'ffffffff'"):
        compare_runs(seeded.catalog, run_ids=[first, "ffffffff"])


def test_lineage_from_run_uri_or_manifest(seeded: Seeded) -> None:
    run_id, manifest = seeded.ids["a-3g128-ao"], seeded.manifests["a-3g128-ao"]
    by_run = lineage(seeded.catalog, ref=run_id[:8])
    assert by_run.matched_by == "run" and by_run.run_id == run_id
    assert [n.kind for n in by_run.nodes] == ["base", "adapter", "adapter", "spec", "run", "artifact",
                                              "publication", "publication"]
    base, lora_x, lora_y, spec = by_run.nodes[:4]
    assert (base.ref, base.sha) == (BASE_A, SHA_A)
    assert (lora_x.ref, lora_x.sha, lora_y.ref, lora_y.detail["position"]) == (LORA_X, SHA_X, LORA_Y, 1)
    assert spec.ref == "gptq-3bit-128g-actorder" and spec.detail["spec"]["quantize"]["bits"] == 3
    assert {n.sha for n in by_run.nodes[5:]} == {manifest}
    hub = "https://huggingface.co/org/a-3g128-ao/tree/gptq"
    by_uri = lineage(seeded.catalog, ref=hub)
    assert by_uri.matched_by == "uri" and by_uri.run_id == run_id and by_uri.nodes == by_run.nodes
    # a rerun that reused the artifact: both runs are listed, the chain follows the earliest
    rerun = str(uuid.uuid4())
    seeded.catalog.start_run(run_id=rerun, name="rerun", spec={}, run_key="key-rerun")
    seeded.catalog.record_publication(run_id=rerun, publication=Publication(
        destination="file", uri="file:///store/rerun", manifest_sha256=manifest, size_bytes=1000, reused=True))
    by_sha = lineage(seeded.catalog, ref=manifest.upper())
    assert by_sha.matched_by == "manifest" and by_sha.runs == (run_id, rerun) and by_sha.run_id == run_id
    assert [n.detail["run_id"] for n in by_sha.nodes if n.kind == "publication"][-1] == rerun
    with pytest.raises(CatalogNotFoundError, match="is no run id, artifact or publication URI, or manifest"):
        lineage(seeded.catalog, ref="file:///nowhere")


def test_leaderboard_per_base(seeded: Seeded) -> None:
    boards = leaderboard(seeded.catalog)
    assert [b.base_uri for b in boards] == [BASE_B, BASE_A]  # most recent finished run first
    board_a = boards[1]
    assert {r.name: r.kld_mean for r in board_a.rows}["a-2g64"] == 0.2
    assert board_a.runs == 6 and seeded.names(board_a.rows) == [
        "a-3g128", "a-3g128-ao", "a-4g128", "a-4g32", "a-8g128", "a-2g64"]  # passed by speed, then rejected
    (only,) = leaderboard(seeded.catalog, base=SHA_B, rows=5)
    assert seeded.names(only.rows) == ["b-4g128"]
    with pytest.raises(CatalogNotFoundError):
        leaderboard(seeded.catalog, base="org/nothing")


# --------------------------------------------------------------------------- rendering


def test_renderings(seeded: Seeded) -> None:
    cat = seeded.catalog
    rows = query_runs(cat, filters=RunFilter(base=BASE_A))
    best = best_build(cat, base=BASE_A, max_ppl_increase_pct=3)
    comparison = compare_runs(cat, run_ids=[seeded.ids["a-4g128"], seeded.ids["a-3g128"]])
    chain = lineage(cat, ref=seeded.ids["a-4g128"])
    console = Console(file=io.StringIO(), width=250, color_system=None)
    for table in (rows_table(rows), best_table(best), comparison_table(comparison), lineage_table(chain)):
        console.print(table)
    out = console.file.getvalue()
    assert "a-3g128-ao" in out and "★ best: " + seeded.ids["a-3g128"] in out
    assert "(+23.1%)" in out and SHA_A in out
    parsed = list(csv.DictReader(io.StringIO(rows_csv(rows))))
    assert [r["name"] for r in parsed] == [r.name for r in rows] and parsed[-1]["decode_speedup"] == "1.3"
    assert (parsed[-1]["kld_mean"], parsed[-1]["top1_agreement_pct"], parsed[-1]["task_recovery_pct"]) == (
        "0.02", "97.5", "98.0")
    assert "top-1 %" in out and "recovery %" in out and "0.055" in out and "96.5" in out
    assert [r["best"] for r in csv.DictReader(io.StringIO(best_csv(best)))] == ["False"] * 3 + ["True"]
    header = next(csv.reader(io.StringIO(comparison_csv(comparison))))
    assert header[:3] == ["metric", "side", "unit"] and len(header) == 6
    assert [r["link"] for r in csv.DictReader(io.StringIO(lineage_csv(chain)))][:2] == ["base", "adapter"]
    detail = cat.get_run(seeded.ids["a-4g128"])
    assert "perplexity,fp16,10.0,ppl" in detail_csv(detail)
    markdown = run_markdown(detail)
    assert "| perplexity | 10 | 10.1 |" in markdown and "| max_ppl_increase_pct | 5 | 1 | yes |" in markdown
    # every metric recorded, one table per family
    sections = [line for line in markdown.splitlines() if line.startswith("### ")]
    assert sections == ["### quality vs fp16", "### tasks (lm-eval)", "### speed", "### size and memory"]
    assert "| kld_mean |  |  | 0.02 |  | nats |" in markdown and "| task_piqa_acc | 0.6 | 0.588 |" in markdown
    assert markdown.index("### tasks (lm-eval)") < markdown.index("| task_recovery_pct_piqa |")


# --------------------------------------------------------------------------- migration 0003


def test_upgrade_from_0002_backfills_ratios_and_sources(catalog_url: str) -> None:  # noqa: F811
    with at_revision(catalog_url, "0002") as engine, engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO runs (id, name, status, run_key, spec, adapters, library_versions, host, started_at, "
            "base_uri, base_sha, config, bits, group_size, desc_act) VALUES ('old-0002', 'old', 'passed', 'k', "
            "'{}', :adapters, '{}', '{}', CURRENT_TIMESTAMP, 'org/old', 'f00d', 'gptq-4bit-128g', 4, 128, :f)"),
            {"adapters": json.dumps([{"uri": "me/old-lora", "sha": "beef", "weight": 0.5}]), "f": False})
        for name, value in (("decode_speedup", 1.5), ("ppl_increase_pct", 2.0)):
            conn.execute(text("INSERT INTO metrics (run_id, name, side, value, unit) "
                              "VALUES ('old-0002', :n, 'delta', :v, 'x')"), {"n": name, "v": value})
    with open_catalog(catalog_url, auto_upgrade=True) as cat:
        (row,) = query_runs(cat, filters=RunFilter(base="org/old", adapter="me/old-lora"))
        assert (row.decode_speedup, row.ppl_increase_pct, row.size_ratio) == (1.5, 2.0, None)
        assert best_build(cat, base="f00d").best.id == "old-0002"
        assert lineage(cat, ref="old-0002").nodes[1].detail["weight"] == 0.5


# --------------------------------------------------------------------------- migration 0007


def test_upgrade_from_0006_backfills_the_verdict_columns(catalog_url: str) -> None:  # noqa: F811
    with at_revision(catalog_url, "0006") as engine, engine.begin() as conn:
        conn.execute(text("INSERT INTO base_models (uri, sha, first_seen) VALUES ('org/old', 'f00d', CURRENT_TIMESTAMP)"))
        base_id = conn.execute(text("SELECT id FROM base_models WHERE uri = 'org/old'")).scalar()
        for run_id, kld in (("old-0006", 0.04), ("older-0006", None)):
            conn.execute(text(
                "INSERT INTO runs (id, name, status, run_key, spec, adapters, library_versions, host, started_at, "
                "base_uri, base_sha, base_model_id, ppl_increase_pct, decode_speedup) VALUES (:id, 'old', 'passed', "
                "'k', '{}', '[]', '{}', '{}', CURRENT_TIMESTAMP, 'org/old', 'f00d', :base, 2.0, 1.5)"),
                {"id": run_id, "base": base_id})
            if kld is not None:
                for name, value in (("kld_mean", kld), ("task_recovery_pct", 96.0), ("kld_p99", 0.5)):
                    conn.execute(text("INSERT INTO metrics (run_id, name, side, value, unit) "
                                      "VALUES (:id, :n, 'delta', :v, '')"), {"id": run_id, "n": name, "v": value})
    with open_catalog(catalog_url, auto_upgrade=True) as cat:
        (row,) = query_runs(cat, filters=RunFilter(max_kld=0.05))
        assert (row.id, row.kld_mean, row.task_recovery_pct, row.top1_agreement_pct) == ("old-0006", 0.04, 96.0, None)
        assert best_build(cat, base="org/old", filters=RunFilter(min_task_recovery=95)).best.id == "old-0006"
        assert [r.id for r in query_runs(cat, sort="kld")] == ["old-0006", "older-0006"]
