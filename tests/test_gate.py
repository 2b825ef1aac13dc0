"""The gate: every configured threshold checked, every failure reported with both sides' values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfactory.core.errors import SpecError
from modelfactory.core.records import BenchmarkResult, SideMetrics
from modelfactory.core.specs import DEFAULT_GATE, GateSpec, parse_spec
from modelfactory.tasks.gate import decide_before_benchmark, evaluate_gate


def Thresholds(**thresholds) -> GateSpec:  # noqa: N802 - reads as the spec it builds
    """A gate of these thresholds alone (``preset: none``): the mechanics, without the default gate."""
    return GateSpec(preset="none", **thresholds)


def side(name: str, *, perplexity: float | None, decode: float, disk: int, mem: int,
         by_batch: dict[int, float] | None = None) -> SideMetrics:
    return SideMetrics(
        side=name, device="cpu", dtype="bfloat16", kernel="dense" if name == "fp16" else "TorchQuantLinear",
        disk_bytes=disk, load_s=0.5, memory_kind="rss", mem_after_load_bytes=mem, mem_peak_decode_bytes=mem + 10,
        mem_peak_bytes=mem + 20, decode_tok_s=decode, ttft_ms=12.0, perplexity=perplexity, ppl_tokens=1000,
        ppl_tokens_sha256="0" * 64, sample_text="hello", decode_tok_s_by_batch=by_batch or {},
    )


def result(fp16: SideMetrics, gptq: SideMetrics) -> BenchmarkResult:
    return BenchmarkResult(fp16=fp16, gptq=gptq, path="/tmp/bench")


# fp16 10 ppl / 100 tok/s / 1000 B / 2000 B; gptq 20 ppl / 50 tok/s / 900 B / 1800 B
FP16 = side("fp16", perplexity=10.0, decode=100.0, disk=1000, mem=2000)
GPTQ = side("gptq", perplexity=20.0, decode=50.0, disk=900, mem=1800)


def test_ratios():
    assert result(FP16, GPTQ).ratios() == {
        "ppl_increase_pct": 100.0, "decode_speedup": 0.5, "size_ratio": 0.9, "memory_ratio": 0.9,
    }


def test_no_thresholds_passes_with_no_checks():
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(require_runnable=False))
    assert decision.passed is True
    assert decision.checks == ()
    assert decision.summary() == "passed (0 checks)"


def test_every_failure_reported_at_once_with_both_values():
    spec = Thresholds(max_ppl_increase_pct=5, min_decode_speedup=1.5, max_size_ratio=0.3, max_memory_ratio=0.5)
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=spec)
    assert decision.passed is False
    assert len(decision.checks) == 4
    failures = decision.failures()
    assert {c.metric for c in failures} == {
        "max_ppl_increase_pct", "min_decode_speedup", "max_size_ratio", "max_memory_ratio",
    }
    expected = {
        "max_ppl_increase_pct": ("fp16 10,", "gptq 20)", "100 > 5"),
        "min_decode_speedup": ("fp16 100,", "gptq 50)", "0.5 < 1.5"),
        "max_size_ratio": ("fp16 1000,", "gptq 900)", "0.9 > 0.3"),
        "max_memory_ratio": ("fp16 2000,", "gptq 1800)", "0.9 > 0.5"),
    }
    for check in failures:
        for fragment in expected[check.metric]:
            assert fragment in check.message, (fragment, check.message)
    by_metric = {c.metric: c for c in failures}
    assert by_metric["min_decode_speedup"].baseline == 100.0
    assert by_metric["min_decode_speedup"].candidate == 50.0
    assert by_metric["min_decode_speedup"].observed == 0.5
    summary = decision.summary()
    assert summary.startswith("rejected: ")
    assert all(c.message in summary for c in failures)


def test_only_failing_checks_fail():
    spec = Thresholds(max_ppl_increase_pct=150, min_decode_speedup=1.5, max_size_ratio=1.0)
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=spec)
    assert not decision.passed
    assert [c.passed for c in decision.checks] == [True, False, True]
    assert [c.metric for c in decision.failures()] == ["min_decode_speedup"]


def test_boundary_equality_passes():
    # Ratios exactly representable in binary floating point.
    fp16 = side("fp16", perplexity=8.0, decode=10.0, disk=100, mem=100)
    gptq = side("gptq", perplexity=10.0, decode=20.0, disk=50, mem=25)
    spec = Thresholds(max_ppl_increase_pct=25, min_decode_speedup=2.0, max_size_ratio=0.5, max_memory_ratio=0.25)
    decision = evaluate_gate(result=result(fp16, gptq), spec=spec)
    assert decision.passed, decision.summary()
    assert len(decision.checks) == 4


@pytest.mark.parametrize(
    "fp16_ppl,gptq_ppl,limit",
    [(10.0, 11.0, 10.0), (10.0, 10.5, 5.0), (10.0, 13.0, 30.0)],
)
def test_boundary_equality_passes_despite_float_rounding(fp16_ppl, gptq_ppl, limit):
    # (11 / 10 - 1) * 100 == 10.000000000000009 in floating point: still a 10 % increase.
    assert (gptq_ppl / fp16_ppl - 1) * 100 > limit  # the case this test is about
    fp16 = side("fp16", perplexity=fp16_ppl, decode=10.0, disk=100, mem=100)
    gptq = side("gptq", perplexity=gptq_ppl, decode=10.0, disk=100, mem=100)
    decision = evaluate_gate(result=result(fp16, gptq), spec=Thresholds(max_ppl_increase_pct=limit))
    assert decision.passed, decision.summary()
    assert f"{limit:g} <= {limit:g}" in decision.checks[0].message


def test_just_over_the_boundary_fails():
    fp16 = side("fp16", perplexity=10.0, decode=10.0, disk=100, mem=100)
    gptq = side("gptq", perplexity=11.0001, decode=10.0, disk=100, mem=100)
    decision = evaluate_gate(result=result(fp16, gptq), spec=Thresholds(max_ppl_increase_pct=10))
    assert not decision.passed


def test_unmeasured_perplexity_fails_the_ppl_check():
    gptq = side("gptq", perplexity=None, decode=50.0, disk=900, mem=1800)
    decision = evaluate_gate(result=result(FP16, gptq), spec=Thresholds(max_ppl_increase_pct=1000))
    assert not decision.passed
    (check,) = decision.checks
    assert check.observed is None and check.candidate is None
    assert "not measured" in check.message
    assert "gptq n/a" in check.message and "fp16 10" in check.message


def test_unmeasured_baseline_memory_fails_the_memory_check():
    fp16 = side("fp16", perplexity=10.0, decode=100.0, disk=1000, mem=0)
    decision = evaluate_gate(result=result(fp16, GPTQ), spec=Thresholds(max_memory_ratio=10))
    assert not decision.passed
    assert "not measured" in decision.checks[0].message


def test_gate_spec_rejects_unknown_metric():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        GateSpec(max_latency_ms=10)
    with pytest.raises(SpecError, match="gate.max_latency_ms"):
        parse_spec({"base": {"uri": "org/model"}, "gate": {"max_latency_ms": 10}})


def test_gate_spec_rejects_nonsense_thresholds():
    with pytest.raises(ValidationError):
        GateSpec(max_ppl_increase_pct=-1)
    with pytest.raises(ValidationError):
        GateSpec(min_decode_speedup=0)


def test_nan_perplexity_fails():
    gptq = side("gptq", perplexity=float("nan"), decode=50.0, disk=900, mem=1800)
    decision = evaluate_gate(result=result(FP16, gptq), spec=Thresholds(max_ppl_increase_pct=1000))
    assert not decision.passed
    assert "nan" in decision.checks[0].message


# --------------------------------------------------------------------------- decode speed-up per batch size
# fp16 100 / 400 / 800 tok/s at batch 1 / 8 / 32; gptq 50 / 400 / 1200
FP16_B = side("fp16", perplexity=10.0, decode=100.0, disk=1000, mem=2000, by_batch={1: 100.0, 8: 400.0, 32: 800.0})
GPTQ_B = side("gptq", perplexity=20.0, decode=50.0, disk=900, mem=1800, by_batch={1: 50.0, 8: 400.0, 32: 1200.0})


def test_ratios_per_batch_size():
    ratios = result(FP16_B, GPTQ_B).ratios()
    assert ratios["decode_speedup"] == 0.5  # batch 1 keeps its name
    assert (ratios["decode_speedup_b8"], ratios["decode_speedup_b32"]) == (1.0, 1.5)
    assert "decode_speedup_b1" not in ratios


def test_records_without_batch_sizes_still_read():
    """Records written before batch sizes existed: batch 1 is their decode_tok_s, nothing else measured."""
    data = FP16.model_dump(mode="json")
    del data["decode_tok_s_by_batch"]
    old = SideMetrics.model_validate(data)
    assert old.decode_tok_s_by_batch == {} and old.decode_rate(1) == 100.0 and old.decode_rate(8) is None
    stored = BenchmarkResult(fp16=old, gptq=GPTQ, path="/tmp/bench").model_dump(mode="json")
    for key in ("baseline_path", "baseline_reused"):
        del stored[key]
    again = BenchmarkResult.model_validate(stored)
    assert again.baseline_path is None and again.ratios() == result(FP16, GPTQ).ratios()


def test_per_batch_thresholds_pass():
    spec = Thresholds(min_decode_speedup_by_batch={8: 1.0, 32: 1.2})
    decision = evaluate_gate(result=result(FP16_B, GPTQ_B), spec=spec)
    assert decision.passed, decision.summary()
    assert [c.metric for c in decision.checks] == ["min_decode_speedup_b8", "min_decode_speedup_b32"]
    assert decision.checks[0].message == "decode speed-up x at batch 8: 1 >= 1 (fp16 400, gptq 400)"


def test_per_batch_thresholds_fail_with_both_values_each():
    spec = Thresholds(min_decode_speedup=0.4, min_decode_speedup_by_batch={1: 0.6, 8: 1.1, 32: 1.6})
    decision = evaluate_gate(result=result(FP16_B, GPTQ_B), spec=spec)
    assert not decision.passed
    by_metric = {c.metric: c for c in decision.checks}
    assert by_metric["min_decode_speedup"].passed  # batch 1 at 0.4 passes, at 0.6 (by batch) fails
    assert [c.metric for c in decision.failures()] == [
        "min_decode_speedup_b1", "min_decode_speedup_b8", "min_decode_speedup_b32"]
    expected = {1: ("0.5 < 0.6", "fp16 100,", "gptq 50)"), 8: ("1 < 1.1", "fp16 400,", "gptq 400)"),
                32: ("1.5 < 1.6", "fp16 800,", "gptq 1200)")}
    for batch, fragments in expected.items():
        check = by_metric[f"min_decode_speedup_b{batch}"]
        assert check.message.startswith(f"decode speed-up x at batch {batch}: ")
        assert all(f in check.message for f in fragments), check.message
        assert check.message in decision.summary()
    assert (by_metric["min_decode_speedup_b32"].baseline, by_metric["min_decode_speedup_b32"].candidate) == (800, 1200)


def test_per_batch_threshold_of_an_unmeasured_batch_size_fails_not_measured():
    spec = Thresholds(min_decode_speedup_by_batch={8: 1.0, 64: 0.5})
    decision = evaluate_gate(result=result(FP16_B, GPTQ_B), spec=spec)
    assert not decision.passed
    (check,) = decision.failures()
    assert check.metric == "min_decode_speedup_b64" and check.observed is None
    assert check.message == "decode speed-up x at batch 64: not measured (fp16 n/a, gptq n/a)"
    # measured on one side only: still not measured, with the side that has it shown
    gptq = side("gptq", perplexity=20.0, decode=50.0, disk=900, mem=1800, by_batch={1: 50.0, 8: 400.0, 64: 9.0})
    (check,) = evaluate_gate(result=result(FP16_B, gptq), spec=Thresholds(min_decode_speedup_by_batch={64: 0.5})).checks
    assert not check.passed and "not measured (fp16 n/a, gptq 9)" in check.message
    # an old record (no batch sizes) against a batch-8 threshold
    (check,) = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(min_decode_speedup_by_batch={8: 0.5})).checks
    assert not check.passed and "not measured" in check.message


def test_per_batch_thresholds_validated():
    assert GateSpec(min_decode_speedup_by_batch={"32": 1, 8: 2.5}).min_decode_speedup_by_batch == {8: 2.5, 32: 1.0}
    for bad, words in [({8: 0}, "must be > 0"), ({8: -1.0}, "must be > 0"), ({0: 1.0}, "between 1 and 256"),
                       ({512: 1.0}, "between 1 and 256"), ({}, "is empty")]:
        with pytest.raises(ValidationError, match=words):
            GateSpec(min_decode_speedup_by_batch=bad)
    with pytest.raises(SpecError, match="gate.min_decode_speedup_by_batch"):
        parse_spec({"base": {"uri": "org/model"}, "gate": {"min_decode_speedup_by_batch": {"eight": 1.0}}})


# --------------------------------------------------------------------------- agreement, tasks, runnability (issue 12)
from modelfactory.benchmark.runnability import RunnabilityReport, RunnabilityResult
from modelfactory.core.records import AgreementMetrics, TaskMetrics
from modelfactory.tasks.gate import check_runnability

AGREEMENT = AgreementMetrics(positions=1000, top_k=256, vocab_size=49152, kld_method="exact", kld_mean=0.05,
                             kld_median=0.02, kld_p99=0.6, kld_max=2.0, top1_agreement_pct=90.0, rest_mass_mean=0.01,
                             lower_bound_kld_mean=0.045, lower_bound_kld_p99=0.55, kernel="TorchQuantLinear")


def with_tasks(base: SideMetrics, **tasks: TaskMetrics) -> SideMetrics:
    return base.model_copy(update={"tasks": tasks})


#: piqa: acc_norm 0.66 -> 0.627 (95 %); hellaswag-like task without acc_norm: acc 0.5 -> 0.45 (90 %).
FP16_T = with_tasks(FP16, piqa=TaskMetrics(acc=0.635, acc_stderr=0.02, acc_norm=0.66, acc_norm_stderr=0.02, n_docs=400),
                    arc=TaskMetrics(acc=0.5, acc_stderr=0.03, n_docs=100))
GPTQ_T = with_tasks(GPTQ, piqa=TaskMetrics(acc=0.605, acc_stderr=0.02, acc_norm=0.627, acc_norm_stderr=0.02, n_docs=400),
                    arc=TaskMetrics(acc=0.45, acc_stderr=0.03, n_docs=100))


def full() -> BenchmarkResult:
    return BenchmarkResult(fp16=FP16_T, gptq=GPTQ_T, path="/tmp/bench", agreement=AGREEMENT)


def test_ratios_with_agreement_and_tasks():
    ratios = full().ratios()
    assert ratios["kld_mean"] == 0.05 and ratios["kld_p99"] == 0.6 and ratios["top1_agreement_pct"] == 90.0
    assert ratios["task_recovery_pct_piqa"] == pytest.approx(95.0)  # acc_norm
    assert ratios["task_recovery_pct_arc"] == pytest.approx(90.0)  # no acc_norm: acc
    assert ratios["task_recovery_pct"] == pytest.approx(90.0)  # the worst task


def test_agreement_thresholds_pass_and_fail_with_both_values():
    ok = evaluate_gate(result=full(), spec=Thresholds(max_kld_mean=0.05, max_kld_p99=1.0, min_top1_agreement_pct=90))
    assert ok.passed and [c.metric for c in ok.checks] == ["max_kld_mean", "max_kld_p99", "min_top1_agreement_pct"]
    bad = evaluate_gate(result=full(), spec=Thresholds(max_kld_mean=0.01, max_kld_p99=0.5, min_top1_agreement_pct=95))
    assert not bad.passed and len(bad.failures()) == 3
    by = {c.metric: c for c in bad.checks}
    assert by["max_kld_mean"].message == ("mean KL(fp16||gptq) nats (exact, kernel TorchQuantLinear): 0.05 > 0.01 "
                                          "(fp16 0, gptq 0.05)")
    assert "0.6 > 0.5" in by["max_kld_p99"].message
    assert by["min_top1_agreement_pct"].message == "top-1 agreement %: 90 < 95 (fp16 100, gptq 90)"


def test_agreement_threshold_without_agreement_fails_not_measured():
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(max_kld_mean=1.0))
    (check,) = decision.checks
    assert not decision.passed and "not measured" in check.message and check.observed is None


def test_task_recovery_one_number_checks_every_task():
    decision = evaluate_gate(result=full(), spec=Thresholds(min_task_recovery_pct=92))
    by = {c.metric: c for c in decision.checks}
    assert set(by) == {"min_task_recovery_pct_arc", "min_task_recovery_pct_piqa"}
    assert by["min_task_recovery_pct_piqa"].passed
    arc = by["min_task_recovery_pct_arc"]
    assert not arc.passed and arc.message == "arc acc recovery %: 90 < 92 (fp16 0.5, gptq 0.45)"
    assert "piqa acc_norm recovery %: 95 >= 92 (fp16 0.66, gptq 0.627)" == by["min_task_recovery_pct_piqa"].message


def test_task_recovery_per_task_and_unmeasured_task():
    decision = evaluate_gate(result=full(), spec=Thresholds(min_task_recovery_pct={"piqa": 96.0, "winogrande": 90.0}))
    by = {c.metric: c for c in decision.checks}
    assert not by["min_task_recovery_pct_piqa"].passed
    assert "not measured" in by["min_task_recovery_pct_winogrande"].message
    none = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(min_task_recovery_pct=90))
    assert not none.passed and "not measured" in none.checks[0].message


def test_task_recovery_spec_validation():
    with pytest.raises(ValidationError, match="empty"):
        GateSpec(min_task_recovery_pct={})
    with pytest.raises(ValidationError, match="between 0 and 1000"):
        GateSpec(min_task_recovery_pct=-1)
    with pytest.raises(SpecError, match="benchmark.tasks.names is empty"):
        parse_spec({"base": {"uri": "org/model"}, "gate": {"min_task_recovery_pct": 95}})
    with pytest.raises(SpecError, match=r"not in benchmark.tasks.names.*\['arc'\]"):
        parse_spec({"base": {"uri": "org/model"}, "benchmark": {"tasks": {"names": ["piqa_local"]}},
                    "gate": {"min_task_recovery_pct": {"piqa_local": 95, "arc": 90}}})
    with pytest.raises(SpecError, match="agreement.enabled is false"):
        parse_spec({"base": {"uri": "org/model"}, "benchmark": {"agreement": {"enabled": False}},
                    "gate": {"max_kld_p99": 1.0}})


def _attempt(device: str = "cpu", *, ok: bool = True, backend: str | None = None, **fields) -> RunnabilityResult:
    return RunnabilityResult(device=device, backend=backend, ok=ok, snippet="...", stage=fields.pop("stage", "done"),
                             wall_s=1.0, kernel=fields.pop("kernel", "TorchAtenLinear"), positions=48,
                             top1_agreement_pct=fields.pop("agreement", 100.0 if ok else None), **fields)


def _report(*attempts: RunnabilityResult) -> RunnabilityReport:
    return RunnabilityReport(model_dir="/m", results=attempts)


MISFIT = dict(ok=False, stage="generate", failure_kind="kernel", error_type="RuntimeError",
              error_message="expect K to be divisible by qGroupSize",
              explanation="group size 64 does not divide layer width 96 ... use group_size 32")
OFFLINE = dict(ok=False, stage="load", failure_kind="environment", error_type="RuntimeError",
               error_message="Machete: GPTQMODEL_OFFLINE=1 and no verified CUTLASS",
               explanation="GPTQModel's Machete kernel ... needs the CUTLASS v4.7.1 sources")
GARBAGE = dict(ok=False, failure_kind="artifact", agreement=12.5,
               explanation="computes something else than the model the factory measured: 12.5 % < 90 %")


def test_runnability_fails_the_gate_with_the_library_error_and_the_advice():
    broken = _report(_attempt(**MISFIT), _attempt(backend="gptq_torch", **{**MISFIT, "failure_kind": "artifact"}))
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(), runnability=broken)
    (check,) = decision.checks
    assert not decision.passed and check.metric == "require_runnable"
    assert "cpu: broken" in check.message and "use group_size 32" in check.message
    assert check == check_runnability(broken)
    assert evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(), runnability=_report(_attempt())).passed


def test_a_healthy_artifact_is_not_rejected_because_the_host_is_offline():
    """The default path needs the network (Machete's CUTLASS) and the host has none: the artifact ran on that
    device through another standard kernel, so it passes, and the report says what failed and why."""
    offline = _report(_attempt(), _attempt("cuda", **OFFLINE), _attempt("cuda", backend="gptq_marlin",
                                                                       kernel="MarlinQuantLinear", agreement=98.0))
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(), runnability=offline)
    assert decision.passed, decision.summary()
    cuda = {v.device: v for v in offline.devices}["cuda"]
    assert (cuda.status, cuda.path, cuda.default_ok) == ("verified", "gptq_marlin", False)
    assert "CUTLASS" in cuda.reason and offline.verified_paths() == {"cpu": "default", "cuda": "gptq_marlin"}
    # the stricter setting: the default path must work
    strict = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(require_default_path=True), runnability=offline)
    assert not strict.passed and [c.metric for c in strict.failures()] == ["require_default_path"]
    assert "cuda" in strict.failures()[0].message and "CUTLASS" in strict.failures()[0].message


def test_a_default_kernel_that_cannot_serve_the_shape_is_not_the_artifacts_fault():
    report = _report(_attempt("cuda", **{**MISFIT, "error_message": "MacheteLinear: out_features: 192 must be "
                                                                    "divisible by [128]"}),
                     _attempt("cuda", backend="gptq_triton", kernel="TritonV2QuantLinear", agreement=97.9))
    assert report.passed and not report.default_path_works


def test_wrong_output_on_any_path_rejects_and_nothing_verified_is_not_a_pass():
    garbage = _report(_attempt(), _attempt("cuda", **GARBAGE))
    assert not garbage.passed and {v.device: v.status for v in garbage.devices} == {"cpu": "verified",
                                                                                     "cuda": "broken"}
    decision = evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(), runnability=garbage)
    assert not decision.passed and "12.5 %" in decision.checks[0].message
    host_only = _report(_attempt(**OFFLINE), _attempt(backend="gptq_torch", **OFFLINE))
    assert not host_only.passed and host_only.environment_only  # the step raises for this (not a rejection)
    assert [v.status for v in host_only.devices] == ["not_verified"]


def test_a_failed_runnability_check_decides_before_the_benchmark():
    broken = _report(_attempt(**MISFIT), _attempt(backend="gptq_torch", **GARBAGE))
    early = decide_before_benchmark(spec=GateSpec(), runnability=broken)
    assert early is not None and not early.passed and early.checks[0].metric == "require_runnable"
    assert decide_before_benchmark(spec=GateSpec(), runnability=_report(_attempt())) is None
    assert decide_before_benchmark(spec=GateSpec(require_runnable=False), runnability=broken) is None
    assert decide_before_benchmark(spec=GateSpec(), runnability=None) is None


def test_runnability_not_checked_when_disabled_or_not_required():
    assert evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(), runnability=None).checks == ()
    assert evaluate_gate(result=result(FP16, GPTQ), spec=Thresholds(require_runnable=False),
                         runnability=_report(_attempt(**GARBAGE))).passed


# --------------------------------------------------------------------------- the default gate
def test_a_spec_without_a_gate_gets_the_default_gate():
    """With no gate in a spec, the documented default gate is in effect (it used to check only "it loads")."""
    spec = parse_spec({"base": {"uri": "org/model"}})
    gate = spec.gate_in_effect()
    assert spec.gate.preset == "default" and gate.preset == "none"
    assert {k: getattr(gate, k) for k in DEFAULT_GATE} == DEFAULT_GATE and gate.require_runnable
    assert gate.describe().startswith("max_ppl_increase_pct=")
    assert all(name in gate.describe() for name in (*DEFAULT_GATE, "require_runnable"))
    # nothing a host changes: no speed, memory or size threshold by default
    assert gate.min_decode_speedup is None and gate.max_memory_ratio is None and gate.max_size_ratio is None
    # a threshold set in the spec wins over the default's; the others stay
    tighter = parse_spec({"base": {"uri": "org/model"}, "gate": {"max_kld_mean": 0.1}}).gate_in_effect()
    assert tighter.max_kld_mean == 0.1 and tighter.max_ppl_increase_pct == DEFAULT_GATE["max_ppl_increase_pct"]
    # the named switch turns the default off
    off = parse_spec({"base": {"uri": "org/model"}, "gate": {"preset": "none"}}).gate_in_effect()
    assert all(getattr(off, k) is None for k in DEFAULT_GATE) and off.describe() == "require_runnable"
    # no agreement measured: the default's KL and top-1 thresholds are not filled in
    no_kl = parse_spec({"base": {"uri": "org/model"}, "benchmark": {"agreement": {"enabled": False}}}).gate_in_effect()
    assert no_kl.max_kld_mean is None and no_kl.min_top1_agreement_pct is None and no_kl.max_ppl_increase_pct


def test_the_run_form_shows_every_threshold_and_the_switch():
    """The flow's parameter is the FactorySpec: its JSON schema is the Prefect UI's run form."""
    from modelfactory.core.specs import FactorySpec

    schema = FactorySpec.model_json_schema()
    gate = schema["$defs"]["GateSpec"]["properties"]
    assert set(GateSpec.model_fields) <= set(gate)
    assert gate["preset"]["enum"] == ["default", "none"] and gate["preset"]["default"] == "default"
    assert all(f"{name} {value:g}" in gate["preset"]["description"] for name, value in DEFAULT_GATE.items())


def test_the_default_gate_checks_kl_and_top1_as_well_as_perplexity():
    """KL and top-1 are measured by default, and now checked by default: a collapse shows there first."""
    collapsed = AGREEMENT.model_copy(update={"kld_mean": 2.5, "top1_agreement_pct": 30.0})
    fp16 = side("fp16", perplexity=10.0, decode=100.0, disk=1000, mem=2000)
    gptq = side("gptq", perplexity=11.0, decode=50.0, disk=300, mem=600)  # +10 %: perplexity alone would pass
    decision = evaluate_gate(result=BenchmarkResult(fp16=fp16, gptq=gptq, path="/b", agreement=collapsed),
                             spec=GateSpec())
    assert not decision.passed
    assert {c.metric for c in decision.failures()} == {"max_kld_mean", "min_top1_agreement_pct"}
    healthy = evaluate_gate(result=BenchmarkResult(fp16=fp16, gptq=gptq, path="/b", agreement=AGREEMENT),
                            spec=GateSpec())
    assert healthy.passed and {c.metric for c in healthy.checks} == set(DEFAULT_GATE)


def test_a_kl_lower_bound_is_reported_but_never_gated():
    """The top-k KL is a lower bound: compared against a maximum it leans towards passing."""
    bound = AGREEMENT.model_copy(update={"kld_method": "topk_lower_bound", "lower_bound_kld_mean": None,
                                         "kld_method_note": "20.0 GiB needed, 12.0 GiB free on cuda"})
    decision = evaluate_gate(result=BenchmarkResult(fp16=FP16, gptq=GPTQ, path="/b", agreement=bound),
                             spec=Thresholds(max_kld_mean=1.0, min_top1_agreement_pct=50))
    by = {c.metric: c for c in decision.checks}
    assert not by["max_kld_mean"].passed and by["max_kld_mean"].observed is None
    assert "not measured" in by["max_kld_mean"].message and "lower bound was measured, 0.05" in by["max_kld_mean"].message
    assert "12.0 GiB free" in by["max_kld_mean"].message
    assert by["min_top1_agreement_pct"].passed  # top-1 is the same in both methods


def test_records_without_agreement_and_tasks_still_read():
    """benchmark.json and GPU-stage outcomes written before issue 12 load with defaults."""
    from modelfactory.gpu_pool.outcome import GpuStageOutcome

    old = {"fp16": FP16.model_dump(mode="json", exclude={"tasks", "tasks_lm_eval_version", "tasks_limit"}),
           "gptq": GPTQ.model_dump(mode="json", exclude={"tasks", "tasks_lm_eval_version", "tasks_limit"}),
           "path": "/tmp/bench"}
    loaded = BenchmarkResult.model_validate(old)
    assert loaded.agreement is None and loaded.fp16.tasks == {}
    assert not {"kld_mean", "task_recovery_pct"} & set(loaded.ratios())
    outcome = GpuStageOutcome.model_validate({"placement": {"flow_run_id": None, "hostname": "h", "pid": 1,
                                                            "cuda_visible_devices": None, "device": "cpu",
                                                            "started_at": "now"}})
    assert outcome.runnability is None
