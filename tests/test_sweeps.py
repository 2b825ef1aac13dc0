"""Sweep spec expansion and winner selection (no model)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from datetime import UTC, datetime

from modelfactory.catalog.records import SweepMemberRow
from modelfactory.core.sweep_spec import SweepSpec
from modelfactory.sweeps import choose_winner, selection


def sweep(**fields) -> SweepSpec:
    return SweepSpec.model_validate({"base": {"uri": "owner/model"}, **fields})


def test_grid_crosses_every_list_onto_the_template():
    spec = sweep(quantize={"damp_percent": 0.1, "calibration": {"seq_len": 256}},
                 grid={"group_size": [128, 64], "desc_act": [False, True]})
    members = spec.members()
    assert [m.label for m in members] == ["gptq-4bit-128g", "gptq-4bit-128g-actorder", "gptq-4bit-64g",
                                          "gptq-4bit-64g-actorder"]
    assert {m.quantize.damp_percent for m in members} == {0.1}
    assert {m.quantize.calibration.seq_len for m in members} == {256}


def test_labels_stay_unique_when_the_label_fields_agree():
    spec = sweep(quantize={"group_size": 128},  # explicit: the default 'auto' is resolved only by the flow
                 grid={"damp_percent": [0.01, 0.1], "calibration_samples": [64, 128]})
    labels = [m.label for m in spec.members()]
    assert len(set(labels)) == 4
    assert "gptq-4bit-128g-damp0.01-cal64" in labels


def test_explicit_list_and_kernels_multiply():
    spec = sweep(configs=[{"group_size": 64}, {"group_size": 32, "bits": 8}], kernels=["gptq_marlin", "gptq_torch"])
    assert [(m.label, m.kernel) for m in spec.members()] == [
        ("gptq-4bit-64g-gptq_marlin", "gptq_marlin"), ("gptq-4bit-64g-gptq_torch", "gptq_torch"),
        ("gptq-8bit-32g-gptq_marlin", "gptq_marlin"), ("gptq-8bit-32g-gptq_torch", "gptq_torch")]


def test_no_grid_is_one_plain_configuration_and_duplicates_collapse():
    assert len(sweep().members()) == 1
    assert len(sweep(configs=[{"group_size": 64}, {"group_size": 64}]).members()) == 1


def test_member_spec_is_a_plain_factory_spec_on_its_own_branch():
    spec = sweep(name="s", grid={"group_size": [64]}, kernels=["gptq_torch"])
    member = spec.members()[0]
    factory = spec.member_spec(member)
    assert factory.quantize.group_size == 64
    assert factory.benchmark.kernel == "gptq_torch"
    assert factory.publish.revision == member.label
    assert factory.name.startswith("s-gptq-4bit-64g")


@pytest.mark.parametrize("fields, words", [
    ({"grid": {"group_size": [64]}, "configs": [{}]}, "either"),
    ({"grid": {"group_size": [7]}}, "group_size=7"),
    ({"grid": {"bits": [2, 3, 4, 8], "group_size": [32, 64, 128, 256], "desc_act": [False, True],
               "damp_percent": [0.01, 0.05, 0.1]}}, "limit of 64"),
])
def test_bad_sweeps_are_rejected_with_the_reason(fields, words):
    with pytest.raises(ValidationError, match=words):
        sweep(**fields)


def member(run_id: str, *, ppl: float | None, size: float | None = None, speedup: float | None = None,
           kld: float | None = None, minute: int = 0) -> SweepMemberRow:
    return SweepMemberRow(run_id=run_id, label=f"cfg-{run_id}", kernel="auto", position=minute, status="running",
                          on_front=False, winner=False, config=None, bits=4, group_size=128, desc_act=False,
                          damp_percent=0.1, calibration_samples=128, ppl_increase_pct=ppl, size_ratio=size,
                          decode_speedup=speedup, memory_ratio=None, kld_mean=kld,
                          started_at=datetime(2026, 12, 7, 10, minute, tzinfo=UTC))


MEMBERS = [
    member("a", ppl=2.0, size=0.30, speedup=1.5, kld=0.05, minute=1),
    member("b", ppl=3.0, size=0.28, speedup=1.6, kld=0.08, minute=2),
    member("c", ppl=3.5, size=0.31, speedup=1.4, kld=0.06, minute=3),  # beaten by a on every axis
    member("d", ppl=0.5, size=0.10, speedup=3.0, kld=0.01, minute=4),  # failed its gate
]
PASSING = {"a", "b", "c"}


@pytest.mark.parametrize("objective, front, winner", [
    ("quality", ["a"], "a"), ("size", ["a", "b"], "b"), ("speed", ["a", "b"], "b")])
def test_the_front_and_the_winner_among_passing_members(objective, front, winner):
    assert selection.front(MEMBERS, objective=objective, passing=PASSING) == front
    assert choose_winner(MEMBERS, objective=objective, passing=PASSING) == winner


def test_no_passing_or_unmeasured_member_means_no_winner():
    assert choose_winner(MEMBERS, objective="size", passing=set()) is None
    assert choose_winner([member("x", ppl=None, size=0.3)], objective="size", passing={"x"}) is None
    assert choose_winner(MEMBERS, objective="memory", passing=PASSING) is None  # memory not measured


def test_catalog_best_and_a_sweeps_winner_agree(tmp_path):
    """One Pareto front definition (issue 25.4): for every objective, ``catalog best`` over the sweep's runs
    names the member the sweep's decision picks, on SQLite (the SQL front) and in memory (the sweep)."""
    from modelfactory.catalog import MetricRecord, open_catalog
    from modelfactory.catalog.queries import best_build
    from modelfactory.sweeps.coordination import decide_sweep

    values = {"r1": (2.0, 0.30, 1.50, 0.31, 0.05), "r2": (3.0, 0.28, 1.60, 0.30, 0.08),
              "r3": (3.0, 0.28, 1.60, 0.29, 0.07), "r4": (1.0, 0.45, 1.10, 0.50, 0.02),
              "r5": (9.0, 0.20, 2.00, 0.25, 0.20)}
    with open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}") as catalog:
        catalog.start_sweep(sweep_id="s1", name="s", spec={}, objective="quality", publish_mode="winner",
                            base_uri="org/base", base_sha="a" * 40)
        for position, (run_id, (ppl, size, speed, memory, kld)) in enumerate(values.items()):
            catalog.start_run(run_id=run_id, name=run_id, spec={}, run_key=run_id)
            catalog.set_sources(run_id=run_id, base_uri="org/base", base_sha="a" * 40, adapters=[])
            catalog.add_member(sweep_id="s1", run_id=run_id, label=run_id, kernel="auto", position=position)
            catalog.record_metrics(run_id=run_id, metrics=[
                MetricRecord(name, "delta", value) for name, value in (
                    ("ppl_increase_pct", ppl), ("size_ratio", size), ("decode_speedup", speed),
                    ("memory_ratio", memory), ("kld_mean", kld))])
        detail = catalog.get_sweep("s1")
        for run_id in values:
            catalog.finish_run(run_id=run_id, status="passed")
        for objective in ("quality", "size", "speed", "memory"):
            decision = decide_sweep(detail, passing=list(values), objective=objective, publish_mode="winner")
            best = best_build(catalog, base="org/base", by=objective)
            assert decision.winner_run_id == best.best.id, objective
            assert set(decision.front) == {row.id for row in best.front}, objective


def test_auto_group_size_is_resolved_before_labels_and_duplicates():
    spec = SweepSpec.model_validate({"base": {"uri": "o/m"}, "configs": [{"group_size": "auto"}, {"group_size": 64},
                                                                          {"group_size": 32}]})
    assert [m.label for m in spec.members()] == ["gptq-4bit-autog", "gptq-4bit-64g", "gptq-4bit-32g"]
    resolved = spec.members(resolve=lambda q: q.resolved(64))
    assert [m.label for m in resolved] == ["gptq-4bit-64g", "gptq-4bit-32g"]  # 'auto' is 64 here: one member
    assert resolved[0].quantize.group_size == 64


def test_publish_mode_picks_what_is_published():
    from modelfactory.sweeps.outcome import to_publish

    assert to_publish(mode="winner", winner="b", passing=["a", "b"]) == ["b"]
    assert to_publish(mode="winner", winner=None, passing=[]) == []
    assert to_publish(mode="all_passing", winner="b", passing=["a", "b"]) == ["a", "b"]
    assert to_publish(mode="none", winner="b", passing=["a", "b"]) == []


def test_local_members_run_one_per_gpu_and_one_per_8_cpu_cores(monkeypatch):
    from modelfactory.sweeps import outcome

    assert outcome.local_member_slots("cuda") == 1
    monkeypatch.setattr(outcome.os, "cpu_count", lambda: 2)
    assert outcome.local_member_slots("cpu") == 1
    monkeypatch.setattr(outcome.os, "cpu_count", lambda: 64)
    assert outcome.local_member_slots("cpu") == 8


def test_sweep_file_errors_read_like_run_spec_errors(tmp_path):
    from modelfactory.core.errors import SpecError
    from modelfactory.core.sweep_spec import load_sweep_spec

    with pytest.raises(SpecError, match="does not exist"):
        load_sweep_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {uri: o/m}\ngrid: {bits: [5]}\n")
    with pytest.raises(SpecError, match=r"invalid spec in .*bad.yaml"):
        load_sweep_spec(bad)
