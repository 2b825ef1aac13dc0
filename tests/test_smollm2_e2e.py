"""The real model: SmolLM2-135M-Instruct (GGUF) + a real LoRA fine-tune, on CPU, end to end and then
through the default gate.

Slow (minutes): it runs the demo's own spec (every step, the PIQA task, the plain-transformers check and
the gate's thresholds) on a smaller token budget, :data:`CI_BUDGET`. With the demo's own budget this
module took 933 s on a 2-core AVX2 machine, about half of the suite's CPU; the README's "Measured" section
gives what ``make demo`` itself measures.

**The default gate on real weights** (second part): the run's own healthy 4-bit build passes the default
gate, and every deliberately broken artifact made from it is rejected. Each goes through what a run does
after quantize: the runnability step (the factory's reference, then plain transformers, which rejects a NaN
artifact before any benchmark), the benchmark against the one fp16 side, and the gate with default settings
(``GateSpec()``). The broken artifacts are made from the healthy one (:mod:`modelfactory.testing.broken`);
they run in plain transformers as they are (the runnability check compares a plain load with the factory's
own load of the *same* files), so for them the test goes straight to the benchmark, where the quality
thresholds must catch them. These checks reuse the end-to-end run's merged model and its quantization
(the flow's own step outputs, served from reuse) rather than quantizing SmolLM2 a second time. Budgets are
cut where the gate does not look (1,024 perplexity tokens: ~1,000 scored positions put a standard error of
~0.02 nats on the KL mean and ~1.5 points on top-1, far inside the margins; a short decode at batch 1); the
gate and its thresholds are the defaults. bench/default_gate.py measures the same variants on a larger
budget (docs/runnability.md, "The default gate").
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelfactory import stage_store
from modelfactory.catalog import open_catalog
from modelfactory.core.manifest import verify_folder
from modelfactory.core.records import ModelArtifact, QuantResult
from modelfactory.core.specs import (
    DEFAULT_GATE,
    BenchmarkSpec,
    FactorySpec,
    GateSpec,
    ModelSource,
    merge_overrides,
)
from modelfactory.interfaces.demo import demo_spec
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing.local import local_root
from modelfactory.sources.finetune import LoraTrainSpec, train_lora
from modelfactory.tasks.benchmark import benchmark_models
from modelfactory.tasks.download import download_model, resolve_adapter
from modelfactory.tasks.gate import decide_before_benchmark, evaluate_gate
from modelfactory.tasks.merge import merge_adapters
from modelfactory.tasks.quantize import quantize_model
from modelfactory.tasks.runnability import check_runnable
from modelfactory.testing.broken import break_artifact
from modelfactory.testing.models import smollm2_gguf

pytestmark = pytest.mark.slow

#: What this module changes in the demo's spec: half of its calibration windows (32 x 512 tokens) and a
#: quarter of its perplexity text (4,096 tokens, 8 windows; KL and top-1 are scored on the same windows).
#: The 100 PIQA items stay: with fewer, recovery would be noise. Measured in float32 on a 2-core AVX2
#: machine: 16 windows quantized in 146 s instead of 416 s, but PIQA recovery fell to 88 % (61 of 100
#: items vs 69), 3 points above the gate's 85 %: too close for a check that must not flake.
CI_BUDGET = {"quantize": {"calibration": {"num_samples": 32}},
             "benchmark": {"perplexity": {"max_tokens": 4096}}}


@pytest.fixture(scope="module", autouse=True)
def _demo_threads():
    """This module's step processes take the demo's thread count (all cores; `make test` pins one OpenMP
    thread per process). The other xdist worker spends much of this time waiting on Prefect servers; when
    it computes too, idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=passive``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("OMP_NUM_THREADS", raising=False)
        patch.setenv("OMP_WAIT_POLICY", "passive")
        yield


@pytest.fixture(scope="module")
def smollm2_spec(prefect):
    gguf = smollm2_gguf()
    base = download_model(source=ModelSource(uri=str(gguf)))
    assert base.kind == "gguf" and len(base.sha) == 64
    adapter, reused = train_lora(base_path=base.path, base_sha=base.sha, spec=LoraTrainSpec(steps=8))
    assert not reused and (adapter / "adapter_model.safetensors").is_file()
    return merge_overrides(demo_spec(gguf, adapter), CI_BUDGET)


@pytest.fixture(scope="module")
def first_run(smollm2_spec):
    start = time.perf_counter()
    outcome = run_factory(smollm2_spec)
    return outcome, time.perf_counter() - start


def test_smollm2_metrics_are_sane(first_run):
    outcome, _ = first_run
    detail = open_catalog().get_run(outcome.run_id)
    fp16_ppl, gptq_ppl = detail.value("perplexity", "fp16"), detail.value("perplexity", "gptq")
    # SmolLM2-135M on raw WikiText-2 test, 512-token windows: ~24 on the demo's 16k tokens in bf16 (docs/benchmarks.md,
    # "make demo, end to end"), ~28 on the first 4k in float32 with this module's shorter fine-tune
    assert 12 < fp16_ppl < 40, fp16_ppl
    assert fp16_ppl < gptq_ppl < 2 * fp16_ppl, (fp16_ppl, gptq_ppl)
    assert detail.value("ppl_increase_pct", "delta") == pytest.approx((gptq_ppl / fp16_ppl - 1) * 100)
    assert 0.3 < detail.value("size_ratio", "delta") < 0.5
    assert detail.value("merge_max_abs_logit_diff") < 1e-3
    assert len(detail.base_sha) == 64  # sha256 of the GGUF file


def test_smollm2_demo_gate_passes_and_publishes(first_run):
    outcome, _ = first_run
    assert outcome.status == "passed", outcome.gate
    manifest = verify_folder(local_root(outcome.artifact_uri))
    assert manifest["sources"]["base"]["sha"] and manifest["sources"]["adapters"]


def test_smollm2_rerun_is_served_from_reuse(first_run, smollm2_spec):
    outcome, first_s = first_run
    start = time.perf_counter()
    again = run_factory(smollm2_spec)
    rerun_s = time.perf_counter() - start
    steps = {s.name: s.status for s in open_catalog().get_run(again.run_id).steps}
    assert steps["quantize"] == steps["merge"] == steps["benchmark"] == "reused", steps
    assert steps["publish"] == "reused" and again.artifact_uri == outcome.artifact_uri
    print(f"first run {first_s:.0f} s, reused rerun {rerun_s:.1f} s")  # timings are reported, not asserted


def test_smollm2_demo_verdict_checks(first_run):
    """The demo's issue-12 checks on the real model: KL / top-1 on the perplexity windows, PIQA on its first
    100 validation items (the demo's bounded subset), and the plain-transformers check on CPU."""
    outcome, _ = first_run
    detail = open_catalog().get_run(outcome.run_id)
    assert 0 < detail.value("kld_mean", "delta") < detail.value("kld_p99", "delta")
    assert 50 < detail.value("top1_agreement_pct", "delta") < 100
    for side in ("fp16", "gptq"):
        assert 0.5 < detail.value("task_piqa_local_acc_norm", side) < 0.9  # 0.690 for fp16 (docs/benchmarks.md)
    assert detail.value("task_recovery_pct", "delta") == detail.value("task_recovery_pct_piqa_local", "delta")
    steps = {s.name: s for s in detail.steps}
    assert steps["runnability"].status == "ok" and steps["runnability"].detail["results"][0]["device"] == "cpu"
    manifest = verify_folder(local_root(outcome.artifact_uri))
    assert manifest["runnability"][0]["ok"] and "/" + "work" not in manifest["runnability"][0]["snippet"]


# --------------------------------------------------------------------------- the default gate on real weights
#: The default gate's benchmark: 1,024 perplexity tokens (KL and top-1 on the same windows), a short decode.
GATE_BENCH = BenchmarkSpec.model_validate({
    "device": "cpu", "perplexity": {"max_tokens": 1024},
    "decode": {"new_tokens": 8, "warmup": 0, "repeats": 1, "batch_sizes": [1]},
    "runnability": {"devices": ["cpu"]},
})


@pytest.fixture(scope="module")
def built(first_run, smollm2_spec) -> tuple[ModelArtifact, QuantResult]:
    """The end-to-end run's merged model and its healthy 4-bit build (group auto -> 64, 32 calibration
    windows), from the flow's own step outputs: every step here is served from reuse."""
    spec = FactorySpec.model_validate(smollm2_spec)
    base = download_model(source=spec.base)
    adapters = tuple(resolve_adapter(spec=adapter) for adapter in spec.adapters)
    merged = merge_adapters(base=base, adapters=adapters, spec=spec.merge)
    quant = quantize_model(model=merged.model, spec=spec.quantize, device="cpu")
    assert merged.model.reused and quant.model.reused, "the run's merge and quantize outputs were not reused"
    return merged.model, quant


def _verdict(fp16: ModelArtifact, quant: QuantResult, *, runnability: bool = True):
    """What a run decides with default settings: the runnability step (unless *runnability* is off), then (unless
    it already rejected) the benchmark and the whole default gate."""
    report = check_runnable(quant=quant, spec=GATE_BENCH) if runnability else None
    if (early := decide_before_benchmark(spec=GateSpec(), runnability=report)) is not None:
        return early, None
    result = benchmark_models(baseline=fp16, candidate=quant.model, spec=GATE_BENCH)
    return evaluate_gate(result=result, spec=GateSpec(), runnability=report), result


def _broken(healthy: QuantResult, tmp_path: Path, **how) -> QuantResult:
    folder = break_artifact(Path(stage_store.resolve(healthy.model.path)), tmp_path / how["how"], **how)
    artifact = ModelArtifact(path=str(folder), sha=f"broken-{how}-{healthy.model.sha}", source_uri="test",
                             kind="gptq")
    return healthy.model_copy(update={"model": artifact})


def test_the_healthy_4bit_artifact_passes_the_default_gate(built):
    fp16, healthy = built
    decision, result = _verdict(fp16, healthy)
    assert decision.passed, decision.summary()
    assert {c.metric for c in decision.checks} == {*DEFAULT_GATE, "require_runnable"}
    assert result.agreement.kld_method == "exact"  # the gated KL is exact, not the top-k lower bound
    assert result.agreement.lower_bound_kld_mean <= result.agreement.kld_mean


@pytest.mark.parametrize("how", [
    {"how": "rtn2"},  # a collapsed low-bit quantization: 2-bit round-to-nearest
    {"how": "scales", "factor": 2.0},  # every scale doubled
    {"how": "g_idx"},  # each layer's group index shuffled
    {"how": "zero_layer", "layer": 0},  # one decoder layer's weights zeroed
], ids=lambda how: "-".join(str(v) for v in how.values()))
def test_a_broken_artifact_is_rejected_by_the_default_gate(built, tmp_path, how):
    fp16, healthy = built
    decision, result = _verdict(fp16, _broken(healthy, tmp_path, **how), runnability=False)
    assert not decision.passed, (how, decision.summary())
    failed = {c.metric for c in decision.failures()}
    assert failed & set(DEFAULT_GATE), (how, decision.summary())  # a quality threshold caught it


def test_a_nan_artifact_is_rejected_before_the_benchmark(built, tmp_path):
    fp16, healthy = built
    decision, result = _verdict(fp16, _broken(healthy, tmp_path, how="nan", layer=15))
    assert not decision.passed and result is None  # the benchmark never ran
    (check,) = decision.checks
    assert check.metric == "require_runnable" and "not finite" in check.message
