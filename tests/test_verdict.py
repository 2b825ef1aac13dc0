"""Issue 12's checks wired into the factory, on the tiny random Llama on CPU (real GPTQModel, real lm-eval,
real plain-transformers processes; no canned scores).

Budgets are tiny on purpose: 256 perplexity tokens, piqa_local on its first 10 documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import modelfactory.tasks.benchmark as step
from modelfactory.benchmark.agreement import DEFAULT_TOP_K
from modelfactory.catalog import open_catalog
from modelfactory.catalog.metrics import benchmark_metrics
from modelfactory.core.records import ModelArtifact
from modelfactory.core.specs import (
    DEFAULT_AGREEMENT_TOP_K,
    BenchmarkSpec,
    QuantSpec,
)
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import make_tiny_llama, tiny_spec
from modelfactory.tasks.publish import runnability_entries
from modelfactory.tasks.runnability import check_runnable

TASKS = {"names": ["piqa_local"], "limit": 10, "batch_size": 8}
TINY_BENCH = {"device": "cpu", "perplexity": {"context_len": 128, "stride": 128, "max_tokens": 256},
              "decode": {"new_tokens": 4, "warmup": 0, "repeats": 1, "batch_sizes": (1, 4)}, "tasks": TASKS}


def test_spec_default_top_k_is_the_measured_one():
    assert DEFAULT_AGREEMENT_TOP_K == DEFAULT_TOP_K


def test_tiny_model_through_every_new_check(tiny_llama, tmp_path):
    from modelfactory.tasks.quantize import quantize_model

    merged = ModelArtifact(path=str(tiny_llama), sha="tiny-verdict", source_uri=str(tiny_llama), kind="merged")
    spec = BenchmarkSpec.model_validate(TINY_BENCH)
    with own_work_dir(tmp_path / "work"):
        quant = quantize_model(model=merged, spec=QuantSpec.model_validate(
            {"bits": 4, "group_size": 32, "calibration": {"num_samples": 4, "seq_len": 64}}), device="cpu")
        report = check_runnable(quant=quant, spec=BenchmarkSpec(device="cpu", runnability={"devices": ["cpu"]}))
        again = check_runnable(quant=quant, spec=BenchmarkSpec(device="cpu", runnability={"devices": ["cpu"]}))
        result = step.benchmark_models(baseline=merged, candidate=quant.model, spec=spec)
        reused = step.benchmark_models(baseline=merged, candidate=quant.model, spec=spec)

    # runnability: ran in plain transformers on CPU, stored and reused
    assert report.passed and report.results[0].device == "cpu" and report.results[0].tokens == 4
    assert again == report
    (entry,) = runnability_entries(report.results, model="org/tiny-gptq")
    assert entry["ok"] and entry["error"] is None and 'from_pretrained("org/tiny-gptq")' in entry["snippet"]
    assert str(quant.model.path) not in json.dumps(entry)

    # agreement: the fp16 reference in the baseline's folder, the stats on the result
    agreement = result.agreement
    assert agreement is not None and agreement.top_k == DEFAULT_TOP_K and agreement.kld_method == "exact"
    assert agreement.lower_bound_kld_mean <= agreement.kld_mean  # the top-k bound, reported next to it
    assert agreement.positions == 254  # 2 windows of 128 tokens, each without its first token
    assert 0 < agreement.kld_mean <= agreement.kld_max and agreement.kld_median <= agreement.kld_p99 <= agreement.kld_max
    assert 0 <= agreement.top1_agreement_pct <= 100
    assert (Path(result.baseline_path) / step.REFERENCE_DIR / "reference.json").is_file()
    assert reused.reused and reused.agreement == agreement

    # tasks: lm-eval's scores on both sides, same documents
    for side in (result.fp16, result.gptq):
        scores = side.tasks["piqa_local"]
        assert scores.n_docs == 10 and 0 <= scores.acc <= 1 and 0 <= scores.acc_norm <= 1
        assert scores.acc_stderr is not None and scores.acc_norm_stderr is not None
        assert side.tasks_limit == 10 and side.tasks_lm_eval_version

    ratios = result.ratios()
    assert ratios["kld_mean"] == agreement.kld_mean and ratios["top1_agreement_pct"] == agreement.top1_agreement_pct
    expected = result.gptq.tasks["piqa_local"].acc_norm / result.fp16.tasks["piqa_local"].acc_norm * 100
    assert ratios["task_recovery_pct_piqa_local"] == pytest.approx(expected)
    assert ratios["task_recovery_pct"] == ratios["task_recovery_pct_piqa_local"]

    names = {(m.name, m.side) for m in benchmark_metrics(result)}
    for side in ("fp16", "gptq"):
        assert {(f"task_piqa_local_{f}", side) for f in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")} <= names
        assert ("decode_tok_s_b4", side) in names
    assert {(n, "delta") for n in ("kld_mean", "kld_p99", "top1_agreement_pct", "task_recovery_pct",
                                   "task_recovery_pct_piqa_local", "decode_speedup_b4")} <= names


# --------------------------------------------------------------------------- the factory rejects
def _store_files() -> list[Path]:
    from modelfactory.core.settings import get_settings
    from modelfactory.publishing.local import local_root

    root = local_root(get_settings().resolved_store_url)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_impossible_task_recovery_rejects_and_publishes_nothing(prefect, tiny_llama):
    before = _store_files()
    spec = tiny_spec(tiny_llama, gate={"min_task_recovery_pct": 1000.0}, publish={"name": "rejected-tasks"})
    spec["benchmark"]["tasks"] = TASKS
    spec["benchmark"]["perplexity"]["max_tokens"] = 256
    outcome = run_factory(spec)
    assert outcome.status == "rejected" and outcome.artifact_uri is None
    detail = open_catalog().get_run(outcome.run_id)
    by = {c.metric: c for c in detail.gate_checks}
    check = by["min_task_recovery_pct_piqa_local"]
    assert not check.passed and "< 1000" in check.message and "fp16" in check.message and "gptq" in check.message
    assert by["require_runnable"].passed
    assert detail.value("task_piqa_local_acc_norm", "fp16") is not None
    assert detail.value("task_recovery_pct_piqa_local", "delta") == check.observed
    assert detail.value("kld_mean", "delta") is not None
    assert "publish" not in [s.name for s in detail.steps] and detail.artifacts == ()
    assert _store_files() == before


def test_unknown_task_fails_before_any_download(prefect, tiny_llama):
    from modelfactory.core.errors import SpecError

    spec = tiny_spec(tiny_llama)
    spec["benchmark"]["tasks"] = {"names": ["piqa_locl"]}
    with pytest.raises(SpecError, match="unknown lm-eval task 'piqa_locl'.*piqa_local"):
        run_factory(spec)
    (run,) = open_catalog().list_runs(limit=1)
    assert open_catalog().get_run(run.id).steps == ()


def test_a_default_kernel_that_cannot_serve_the_shape_passes_and_the_strict_setting_rejects(
        prefect, smollm2_tokenizer_dir, tmp_path_factory):
    """Width 96 quantized at group size 64: a user's plain load on CPU picks torch's int4pack kernel, which cannot
    run it; the portable torch kernel can. The artifact is healthy: it passes, and the run records which path
    was verified and why the default one fails. ``require_default_path`` rejects it, with the library's error
    and what to do."""
    base = make_tiny_llama(tmp_path_factory.mktemp("tiny96-verdict"), smollm2_tokenizer_dir, hidden=96)
    spec = tiny_spec(base, quantize={"bits": 4, "group_size": 64, "calibration": {"num_samples": 8, "seq_len": 64}},
                     publish={"name": "default-path"})
    spec["benchmark"]["perplexity"]["max_tokens"] = 256
    spec["benchmark"]["runnability"] = {"devices": ["cpu"]}
    passed = run_factory(spec)
    assert passed.status == "passed", passed
    steps = {s.name: s for s in open_catalog().get_run(passed.run_id).steps}
    runnability = steps["runnability"].detail
    assert runnability["passed"] and runnability["verified_paths"] == {"cpu": "gptq_torch"}
    default, fallback = runnability["results"]
    assert not default["ok"] and "expect K to be divisible by qGroupSize, got K:96, qGroupSize:64" in default["error"]
    assert fallback["ok"] and fallback["path"] == "gptq_torch" and fallback["top1_agreement_pct"] >= 90

    before = _store_files()
    strict = run_factory({**spec, "name": "strict", "gate": {"preset": "none", "require_default_path": True},
                          "publish": {"name": "not-default-path"}})
    assert strict.status == "rejected", strict
    detail = open_catalog().get_run(strict.run_id)
    (check,) = [c for c in detail.gate_checks if not c.passed]
    assert check.metric == "require_default_path"
    assert "expect K to be divisible by qGroupSize, got K:96, qGroupSize:64" in check.message  # the library's error
    assert "use group_size 32" in check.message  # and what to do
    steps = {s.name for s in detail.steps}
    assert "benchmark" not in steps, "rejected before the benchmark spent anything"
    assert "publish" not in steps and _store_files() == before


def test_an_artifact_that_fails_at_generate_is_rejected_before_the_benchmark(prefect, smollm2_tokenizer_dir,
                                                                             tmp_path_factory):
    """A tiny random Phi3 at group 32 fails at generate with an IndexError. The benchmark used to run anyway and
    crash the run with the library's raw IndexError; now the run is rejected there, with the reason."""
    import shutil

    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    base = tmp_path_factory.mktemp("tiny-phi3")
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                               bos_token_id=1, eos_token_id=2, pad_token_id=2)).to(torch.float16).save_pretrained(base)
    for file in smollm2_tokenizer_dir.iterdir():
        shutil.copy2(file, base / file.name)
    spec = tiny_spec(base, quantize={"bits": 4, "group_size": 32, "calibration": {"num_samples": 4, "seq_len": 64}},
                     publish={"name": "phi3-broken"})
    spec["benchmark"]["runnability"] = {"devices": ["cpu"]}
    outcome = run_factory(spec)
    assert outcome.status == "rejected", outcome
    detail = open_catalog().get_run(outcome.run_id)
    (check,) = detail.gate_checks
    assert check.metric == "require_runnable" and "IndexError" in check.message and "at generate" in check.message
    assert [s.name for s in detail.steps if s.name in ("benchmark", "publish")] == []
