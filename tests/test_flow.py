"""The whole factory flow on a tiny random Llama: real peft, real GPTQModel, real catalog, Prefect harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfactory.catalog import open_catalog
from modelfactory.core.errors import (
    AdapterMismatchError,
    SourceNotFoundError,
    SpecError,
)
from modelfactory.core.manifest import verify_folder
from modelfactory.core.settings import get_settings
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing.local import local_root
from modelfactory.testing.models import make_lora, make_tiny_llama, tiny_spec

STEPS = ["download", "merge", "quantize", "runnability", "benchmark", "gate", "publish"]
#: The tiny model is dominated by its (unquantized) 49k-token embedding, so GPTQ shrinks it only a little.
TINY_GATE = {"max_ppl_increase_pct": 5.0, "max_size_ratio": 0.999}


@pytest.fixture(scope="module")
def tiny_lora(tiny_llama, tmp_path_factory) -> Path:
    return make_lora(tiny_llama, tmp_path_factory.mktemp("tiny-lora"))


def store_files() -> list[Path]:
    root = local_root(get_settings().resolved_store_url)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def passed_run(prefect, tiny_llama, tiny_lora):
    spec = tiny_spec(tiny_llama, adapters=[{"uri": str(tiny_lora)}], gate=TINY_GATE)
    return run_factory(spec)


def test_passing_run_is_published_and_recorded(passed_run):
    assert passed_run.status == "passed", passed_run
    detail = open_catalog().get_run(passed_run.run_id)
    assert detail.status == "passed" and detail.error is None
    assert [s.name for s in detail.steps] == STEPS
    assert detail.base_sha and len(detail.adapters) == 1 and detail.adapters[0]["sha"]
    assert detail.library_versions["gptqmodel"] == "7.6.0"
    for name in ("perplexity", "decode_tok_s", "ttft_ms", "disk_bytes", "mem_after_load_bytes"):
        assert detail.value(name, "fp16") is not None and detail.value(name, "gptq") is not None, name
    assert detail.value("merge_max_abs_logit_diff") < 1e-3
    assert detail.value("size_ratio", "delta") < 1.0  # embeddings (not quantized) dominate a tiny model
    assert [c.metric for c in detail.gate_checks] == ["max_ppl_increase_pct", "max_size_ratio", "require_runnable"]
    assert detail.gate_passed
    (artifact,) = detail.artifacts
    assert artifact.uri == passed_run.artifact_uri
    manifest = verify_folder(local_root(artifact.uri))
    names = {f["path"] for f in manifest["files"]}
    assert {"config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"} <= names
    assert manifest["metrics"]["gptq"]["perplexity"] > 0
    assert manifest["spec"]["quantize"]["bits"] == 4


def test_quantized_checkpoint_loads_in_plain_transformers(passed_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_root(passed_run.artifact_uri)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "gptq" and qconfig["bits"] == 4 and qconfig["group_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "QuantLinear" in "".join(c.__name__ for c in type(model.model.layers[0].mlp.down_proj).__mro__)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False)
    assert out.shape[1] == len(tokenizer("Hello")["input_ids"]) + 5


def test_identical_rerun_reuses_every_step(passed_run, tiny_llama, tiny_lora):
    spec = tiny_spec(tiny_llama, adapters=[{"uri": str(tiny_lora)}], gate=TINY_GATE)
    again = run_factory(spec)
    assert again.status == "passed" and again.artifact_uri == passed_run.artifact_uri
    steps = {s.name: s.status for s in open_catalog().get_run(again.run_id).steps}
    assert steps["merge"] == steps["quantize"] == steps["benchmark"] == steps["publish"] == "reused"


def test_impossible_gate_rejects_reports_every_metric_and_publishes_nothing(passed_run, tiny_llama, tiny_lora):
    before = store_files()
    gate = {"max_ppl_increase_pct": 0.0, "min_decode_speedup": 100.0, "max_size_ratio": 0.01,
            "max_memory_ratio": 0.01}
    spec = tiny_spec(tiny_llama, adapters=[{"uri": str(tiny_lora)}], gate=gate, publish={"name": "rejected"})
    outcome = run_factory(spec)
    assert outcome.status == "rejected" and outcome.artifact_uri is None
    detail = open_catalog().get_run(outcome.run_id)
    assert detail.status == "rejected" and detail.artifacts == ()
    failed = [c for c in detail.gate_checks if not c.passed]
    assert {c.metric for c in failed} >= {"min_decode_speedup", "max_size_ratio", "max_memory_ratio"}
    assert all("fp16" in c.message and "gptq" in c.message for c in failed)
    assert "publish" not in [s.name for s in detail.steps]
    assert store_files() == before


def _latest_failed():
    (run,) = open_catalog().list_runs(limit=1)
    assert run.status == "failed"
    return open_catalog().get_run(run.id)


@pytest.mark.parametrize(
    ("base", "error", "words"),
    [
        ("/nonexistent/model-folder", SourceNotFoundError, ["/nonexistent/model-folder", "does not exist"]),
        ("not a repo id!", SpecError, ["base.uri", "not a repo id!"]),
        ("owner/name/extra", SpecError, ["base.uri", "owner/name/extra"]),
    ],
)
def test_bad_base_fails_clearly_and_publishes_nothing(prefect, base, error, words):
    before = store_files()
    spec = {"name": "bad-base", "base": {"uri": base}}
    with pytest.raises(error) as info:
        run_factory(spec)
    for word in words:
        assert word in str(info.value)
    run = _latest_failed()
    assert run.error and words[-1] in run.error
    assert store_files() == before


def test_unsupported_bits_fails_clearly(prefect, tiny_llama):
    with pytest.raises(SpecError, match=r"bits=5 is not supported.*\(2, 3, 4, 8\)"):
        run_factory(tiny_spec(tiny_llama, quantize={"bits": 5}))
    run = _latest_failed()
    assert run.error_kind == "spec" and "bits" in run.error


def test_adapter_for_another_base_fails_before_merging(prefect, tiny_llama, smollm2_tokenizer_dir, tmp_path):
    other = make_tiny_llama(tmp_path / "other", smollm2_tokenizer_dir, hidden=32)
    adapter = make_lora(other, tmp_path / "other-lora")
    before = store_files()
    with pytest.raises(AdapterMismatchError, match="trained on another base model"):
        run_factory(tiny_spec(tiny_llama, adapters=[{"uri": str(adapter)}]))
    run = _latest_failed()
    assert run.error_kind == "adapter_mismatch"
    assert [s.name for s in run.steps] == ["download"]  # nothing heavy ran
    assert store_files() == before
