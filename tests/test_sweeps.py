"""Sweep spec expansion and winner selection (pure: no model)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfactory.core.sweep_spec import SweepSpec
from modelfactory.sweeps import MemberScore, choose_winner, pareto_front


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


SCORES = [
    MemberScore(label="a", passed=True, size_ratio=0.30, decode_speedup=1.5, kld_mean=0.05),
    MemberScore(label="b", passed=True, size_ratio=0.28, decode_speedup=1.6, kld_mean=0.08),
    MemberScore(label="c", passed=True, size_ratio=0.31, decode_speedup=1.4, kld_mean=0.06),  # beaten by a
    MemberScore(label="d", passed=False, size_ratio=0.10, decode_speedup=3.0, kld_mean=0.01),  # failed the gate
]


def test_front_keeps_only_undominated_passing_members():
    assert pareto_front(SCORES) == ["a", "b"]


@pytest.mark.parametrize("objective, winner", [("closest", "a"), ("smallest", "b"), ("fastest", "b")])
def test_objective_picks_among_passing(objective, winner):
    assert choose_winner(SCORES, objective=objective) == winner


def test_no_passing_member_means_no_winner_and_ppl_stands_in_for_kld():
    assert choose_winner([MemberScore(label="x", passed=False)], objective="closest") is None
    scores = [MemberScore(label="p", passed=True, ppl_increase_pct=30.0),
              MemberScore(label="q", passed=True, ppl_increase_pct=20.0)]
    assert choose_winner(scores, objective="closest") == "q"


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
