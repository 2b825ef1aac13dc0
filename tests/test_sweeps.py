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
    spec = sweep(grid={"damp_percent": [0.01, 0.1], "calibration_samples": [64, 128]})
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
