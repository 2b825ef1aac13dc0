"""Step 7, record: what the catalog holds about a factory run (the session's ``tiny_run``: sources,
steps, library versions, both sides' metrics, gate checks, the artifact and its manifest).

Failed and rejected runs are recorded too: see test_flow.py (early failures, rejection),
test_publish.py (a full store) and test_recovery.py (the catalog going down mid-run)."""

from __future__ import annotations

from modelfactory.catalog import open_catalog
from modelfactory.core.manifest import verify_folder
from modelfactory.publishing.local import local_root

STEPS = ["download", "merge", "quantize", "runnability", "benchmark", "gate", "publish"]


def test_passing_run_is_published_and_recorded(tiny_run):
    outcome = tiny_run.outcome
    assert outcome.status == "passed", outcome
    with open_catalog(tiny_run.catalog_url) as catalog:
        detail = catalog.get_run(outcome.run_id)
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
    assert artifact.uri == outcome.artifact_uri
    manifest = verify_folder(local_root(artifact.uri))
    names = {f["path"] for f in manifest["files"]}
    assert {"config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"} <= names
    assert manifest["metrics"]["gptq"]["perplexity"] > 0
    assert manifest["spec"]["quantize"]["bits"] == 4


def test_the_catalog_records_what_was_measured_and_what_was_published_and_they_agree(tiny_run):
    """Issue 24.3: the published manifest's file hashes equal those of the weights the benchmark loaded; the
    catalog keeps both (the benchmark step's gptq_sha256, the publication's content_sha256) and the
    manifest says it, so a read-back checks it (core.manifest.check_content)."""
    from modelfactory.core.manifest import content_digest

    with open_catalog(tiny_run.catalog_url) as catalog:
        detail = catalog.get_run(tiny_run.outcome.run_id)
    steps = {s.name: s for s in detail.steps}
    measured = steps["benchmark"].detail["gptq_sha256"]
    assert measured and steps["quantize"].detail["sha256"] == measured
    (publication,) = detail.publications
    assert publication.content_sha256 == measured
    manifest = verify_folder(local_root(publication.uri))
    assert manifest["content_sha256"] == measured == content_digest(manifest["files"]) == manifest["key"]
