"""The whole factory flow on a tiny random Llama: real peft, real GPTQModel, real catalog, Prefect harness.

The passing run itself is the session's ``tiny_run`` (conftest; what it recorded is checked in
test_record.py, its checkpoint in test_quantize.py); here: reuse, rejection, early failures, and two
identical runs at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfactory.catalog import open_catalog
from modelfactory.core.errors import (
    AdapterMismatchError,
    SourceNotFoundError,
    SpecError,
)
from modelfactory.core.settings import get_settings
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing.local import local_root
from modelfactory.testing.models import make_lora, make_tiny_llama, tiny_spec
from modelfactory.testing.runs import passing_spec


def store_files() -> list[Path]:
    root = local_root(get_settings().resolved_store_url)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_identical_rerun_reuses_every_step(tiny_run):
    again = run_factory(tiny_run.spec)
    assert again.status == "passed" and again.artifact_uri == tiny_run.outcome.artifact_uri
    steps = {s.name: s.status for s in open_catalog().get_run(again.run_id).steps}
    assert steps["merge"] == steps["quantize"] == steps["benchmark"] == steps["publish"] == "reused"


def test_impossible_gate_rejects_reports_every_metric_and_publishes_nothing(tiny_run, tiny_llama, tiny_lora):
    before = store_files()
    gate = {"max_ppl_increase_pct": 0.0, "min_decode_speedup": 100.0, "max_size_ratio": 0.01,
            "max_memory_ratio": 0.01}
    spec = passing_spec(tiny_llama, tiny_lora, gate=gate, publish={"name": "rejected"})
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
