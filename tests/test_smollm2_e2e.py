"""The real model end to end: SmolLM2-135M-Instruct (GGUF) + a real LoRA fine-tune, on CPU.

Slow (minutes): it runs the demo's own spec (every step, the PIQA task, the plain-transformers check and
the gate's thresholds) on a smaller token budget, :data:`CI_BUDGET`. With the demo's own budget this
module took 933 s on a 2-core AVX2 machine, about half of the suite's CPU; the README's "Measured" section
gives what ``make demo`` itself measures.
"""

from __future__ import annotations

import time

import pytest

from modelfactory.catalog import open_catalog
from modelfactory.core.manifest import verify_folder
from modelfactory.core.specs import ModelSource, merge_overrides
from modelfactory.interfaces.demo import demo_spec
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing.local import local_root
from modelfactory.sources.finetune import LoraTrainSpec, train_lora
from modelfactory.testing.models import smollm2_gguf
from modelfactory.tasks.download import download_model

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
