"""The published evidence: the model card shows fp16 and GPTQ side by side and carries the eval
results as Hub metadata (``model-index``, parsed back with huggingface_hub); its "Load it" code is
the code the runnability check ran; old manifests still render; and nothing published — manifest
or card, to the Hub or a file store — names a path of this machine."""

from __future__ import annotations

import json
import site
import sys
from pathlib import Path

import pytest

from modelfactory.benchmark import plain_load
from modelfactory.benchmark.runnability import (
    RunnabilityReport,
    RunnabilityResult,
    load_snippet,
)
from modelfactory.catalog import open_catalog
from modelfactory.catalog.metrics import manifest_metrics
from modelfactory.catalog.recovery import import_artifact
from modelfactory.core.hashing import file_sha256, step_key, tree_sha256
from modelfactory.core.manifest import MANIFEST, build_manifest, content_digest, verify_folder
from modelfactory.core.records import (
    AdapterArtifact,
    BenchmarkResult,
    GateCheck,
    GateDecision,
    MergeResult,
    ModelArtifact,
    QuantResult,
    SideMetrics,
)
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import FactorySpec
from modelfactory.publishing.local import local_root
from modelfactory.publishing.modelcard import (
    decode_batches,
    measured_values,
    render_card,
    task_names,
)
from modelfactory.publishing.public import (
    local_roots,
    public_ref,
    public_spec,
    retarget_snippet,
    scrub_local_paths,
    scrub_text,
)
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.hub_server import OWNER
from modelfactory.testing.models import TINY_GATE, make_lora, smollm2_gguf, tiny_spec
from modelfactory.tasks.publish import publish_artifact, runnability_entries

REPO_ID, REVISION = f"{OWNER}/smol-gptq", "gptq-4bit-64g"


def checked_snippet(model: str, device: str = "cpu") -> str:
    """The code the runnability check runs on *model* (a local folder there)."""
    return plain_load.snippet(model=model, device=device)


def side(name: str, **values) -> SideMetrics:
    defaults = dict(device="cpu", dtype="bfloat16", kernel="torch" if name == "gptq" else "dense",
                    disk_bytes=270_000_000, load_s=1.0, memory_kind="rss", mem_after_load_bytes=300_000_000,
                    mem_peak_decode_bytes=310_000_000, mem_peak_bytes=320_000_000, decode_tok_s=30.0, ttft_ms=40.0,
                    perplexity=28.76, ppl_tokens=4096, ppl_tokens_sha256="0" * 64, sample_text="Paris.")
    return SideMetrics(side=name, **{**defaults, **values})


def smollm2_bench(path: str = "/nowhere") -> BenchmarkResult:
    """SmolLM2-135M at 4-bit as issue 12 measured it (the sides' records the benchmark writes)."""
    return BenchmarkResult(
        fp16=side("fp16", decode_tok_s_by_batch={1: 30.0, 8: 200.0, 32: 600.0}),
        gptq=side("gptq", perplexity=39.50, decode_tok_s=36.3, disk_bytes=110_000_000, mem_after_load_bytes=150_000_000,
                  decode_tok_s_by_batch={1: 36.3, 8: 150.0, 32: 420.0}),
        path=path)


#: The verdict's metric rows as the benchmark records them (the names agreed with the measurement side).
VERDICT_ROWS = [
    ("kld_mean", "delta", 0.1423, "nats"), ("kld_p99", "delta", 1.87, "nats"),
    ("top1_agreement_pct", "delta", 86.25, "%"),
    ("task_piqa_local_acc", "fp16", 0.635, ""), ("task_piqa_local_acc", "gptq", 0.605, ""),
    ("task_piqa_local_acc_stderr", "fp16", 0.0241, ""), ("task_piqa_local_acc_stderr", "gptq", 0.0244, ""),
    ("task_piqa_local_acc_norm", "fp16", 0.660, ""), ("task_piqa_local_acc_norm", "gptq", 0.635, ""),
    ("task_piqa_local_acc_norm_stderr", "fp16", 0.0237, ""), ("task_piqa_local_acc_norm_stderr", "gptq", 0.0241, ""),
    ("task_arc_easy_acc", "fp16", 0.50, ""), ("task_arc_easy_acc", "gptq", 0.49, ""),
    ("task_recovery_pct_piqa_local", "delta", 95.27, "%"), ("task_recovery_pct_arc_easy", "delta", 98.0, "%"),
    ("task_recovery_pct", "delta", 95.27, "%"),
]


def smollm2_manifest(folder: Path, *, verdict: bool = True, runnability: list[dict] | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    spec = FactorySpec(base={"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
                       quantize={"bits": 4, "group_size": 64}).model_dump(mode="json")
    metrics = manifest_metrics(smollm2_bench())
    if verdict:
        metrics["measured"] += [{"name": n, "side": s, "value": v, "unit": u} for n, s, v, u in VERDICT_ROWS]
    else:  # a manifest written before the verdict's metrics (and before "measured", batch sizes) existed
        metrics.pop("measured")
        metrics["ratios"] = {k: v for k, v in metrics["ratios"].items() if not k.startswith("decode_speedup_b")}
        for name in ("fp16", "gptq"):
            metrics[name].pop("decode_tok_s_by_batch")
    extra = {"runnability": runnability} if runnability else {}
    return build_manifest(folder, name="SmolLM2-135M-Instruct", config="gptq-4bit-64g", key="k" * 24,
                          created_at="2026-11-29T00:00:00+00:00", spec=spec,
                          sources={"base": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "sha": "c" * 40},
                                   "adapters": []},
                          metrics=metrics, engine="gptqmodel 7.6.0",
                          gate={"passed": True, "checks": [
                              {"metric": "min_task_recovery_pct", "threshold": 94.0, "baseline": 0.635,
                               "candidate": 0.605, "observed": 95.27, "passed": True, "message": "ok"}]}, **extra)


# --------------------------------------------------------------------------- the card


def test_card_shows_both_sides_and_the_hub_reads_its_eval_results(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    manifest = smollm2_manifest(tmp_path / "a")
    card = render_card(manifest=manifest, repo_id=REPO_ID, revision=REVISION)
    body = ModelCard(card).text
    for row in (
        "| perplexity (wikitext/wikitext-2-raw-v1:test, 4096 tokens, 512-token windows) | 28.76 | 39.50 | +37.3 % |",
        "| KL(fp16 ‖ GPTQ) per token, mean (nats), same windows | — | 0.14230 |  |",
        "| KL(fp16 ‖ GPTQ) per token, 99th percentile (nats), same windows | — | 1.87000 |  |",
        "| top-1 agreement with fp16 (same most likely next token), same windows | — | 86.25 % |  |",
        "| piqa_local (PIQA validation, lm-eval) acc | 0.6350 ± 0.0241 | 0.6050 ± 0.0244 | 95.3 % of fp16 |",
        "| piqa_local (PIQA validation, lm-eval) acc_norm | 0.6600 ± 0.0237 | 0.6350 ± 0.0241 | 96.2 % of fp16 |",
        "| piqa_local recovery (GPTQ ÷ fp16, as gated) |  |  | 95.3 % |",
        "| arc_easy (AI2 ARC (Easy) test, lm-eval) acc | 0.5000 | 0.4900 | 98.0 % of fp16 |",
        "| task recovery, lowest over tasks |  |  | 95.3 % |",
        "| decode tok/s (batch 1, 64 new tokens, eager) | 30.0 | 36.3 | 1.21× |",
        "| decode tok/s (batch 8, all sequences) | 200.0 | 150.0 | 0.75× |",
        "| decode tok/s (batch 32, all sequences) | 600.0 | 420.0 | 0.70× |",
        "| safetensors on disk | 270.0 MB | 110.0 MB | 0.407× |",
        "| memory after load (rss) | 300.0 MB | 150.0 MB | 0.500× |",
        "| `min_task_recovery_pct` | 94 | 95.27 | pass |",
    ):
        assert row in body, row

    readme = tmp_path / "README.md"
    readme.write_text(card)
    (index,) = metadata_load(readme)["model-index"]
    assert index["name"] == REPO_ID
    results = {(r.task_type, r.task_name, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value
               for r in ModelCard(card).data.eval_results}
    assert results == {
        ("text-generation", None, "wikitext", "test", "perplexity"): 39.5,
        ("text-generation", None, "wikitext", "test", "kld_mean"): 0.1423,
        ("text-generation", None, "wikitext", "test", "kld_p99"): 1.87,
        ("text-generation", None, "wikitext", "test", "top1_agreement_pct"): 86.25,
        ("multiple-choice", "piqa_local", "ybisk/piqa", "validation", "acc"): 0.605,
        ("multiple-choice", "piqa_local", "ybisk/piqa", "validation", "acc_norm"): 0.635,
        ("multiple-choice", "arc_easy", "allenai/ai2_arc", "test", "acc"): 0.49,
    }
    data = ModelCard(card).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.base_model_relation == "quantized"


def test_an_old_manifest_still_renders(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    manifest = smollm2_manifest(tmp_path / "old", verdict=False)
    card = render_card(manifest=manifest, repo_id=REPO_ID, revision=REVISION)
    body = ModelCard(card).text
    assert "| decode tok/s (batch 1, 64 new tokens, eager) | 30.0 | 36.3 | 1.21× |" in body
    assert "KL(" not in body and "lm-eval" not in body and "batch 8" not in body and "Sweep" not in body
    # the Load-it code of before the runnability check existed
    assert f'from_pretrained("{REPO_ID}", revision="{REVISION}", device_map="auto")' in body
    (perplexity,) = ModelCard(card).data.eval_results
    assert (perplexity.metric_type, perplexity.metric_value) == ("perplexity", 39.5)


def test_load_it_is_the_code_the_runnability_check_ran(tmp_path: Path) -> None:
    folder = tmp_path / "work" / "quantize" / "key"
    checks = [{"device": "cpu", "ok": True, "load_s": 1.25, "generate_s": 0.5, "snippet": checked_snippet(str(folder))},
              {"device": "cuda", "ok": True, "load_s": 3.0, "generate_s": 0.1,
               "snippet": checked_snippet(str(folder), "cuda")}]
    manifest = smollm2_manifest(tmp_path / "a", runnability=checks)
    card = render_card(manifest=manifest, repo_id=REPO_ID, revision=REVISION)
    blocks = card.split("```python\n")[1:3]
    # what ran, pointed at the published model: the runnability check's own snippet for the repo
    expected = [load_snippet(model=REPO_ID, revision=REVISION, device="cpu"),
                load_snippet(model=REPO_ID, revision=REVISION, device="cuda")]
    assert [b.split("```")[0] for b in blocks] == expected
    assert expected[0].replace(f'"{REPO_ID}", revision="{REVISION}"', json.dumps(str(folder))) == checks[0]["snippet"]
    assert "On CPU — verified with the default loading path: loads and generates (loaded in 1.2 s, generated in 0.5 s)." in card
    assert "On a CUDA GPU — verified" in card and str(folder) not in card and "device_map=\"auto\"" not in card


def test_the_card_says_which_path_was_verified_where_and_how_close_the_users_kernel_is(tmp_path: Path) -> None:
    """Offline Hopper: the default path (Machete) could not fetch its sources; Marlin was verified instead. The card
    says so, shows the verified code, and how closely the kernel a user gets computes the measured one."""
    checks = runnability_entries([
        {"device": "cpu", "ok": True, "kernel": "TorchAtenLinear", "top1_agreement_pct": 97.9,
         "snippet": checked_snippet("/x/m")},
        {"device": "cuda", "ok": False, "snippet": checked_snippet("/x/m", "cuda"), "error_type": "RuntimeError",
         "error_message": "Machete: GPTQMODEL_OFFLINE=1 and no verified CUTLASS", "explanation": "needs CUTLASS"},
        {"device": "cuda", "ok": True, "backend": "gptq_marlin", "kernel": "MarlinQuantLinear", "top1_agreement_pct": 100.0,
         "snippet": load_snippet(model="/x/m", device="cuda", backend="gptq_marlin", bits=4)}],
        model=REPO_ID, revision=REVISION)
    assert [e["path"] for e in checks] == ["default", "default", "gptq_marlin"]
    manifest = smollm2_manifest(tmp_path / "a", runnability=checks)
    manifest["agreement"] = {"kld_method": "exact"}
    card = render_card(manifest=manifest, repo_id=REPO_ID, revision=REVISION)
    assert ("On a CUDA GPU — the default loading path **did not work** when checked: `RuntimeError: Machete: "
            "GPTQMODEL_OFFLINE=1 and no verified CUTLASS`. needs CUTLASS") in card
    assert "On a CUDA GPU — verified with GPTQModel's `gptq_marlin` kernel (`MarlinQuantLinear`)" in card
    assert 'quantization_config=GPTQConfig(bits=4, backend="gptq_marlin")' in card
    assert "the KL divergence is exact" in card
    assert ("On CPU, the default loading path gets `TorchAtenLinear`: its most likely next token is the measured "
            "kernel's at 97.9 % of the checked positions.") in card


def test_a_failed_device_and_the_sweep_matrix_are_shown(tmp_path: Path) -> None:
    checks = runnability_entries([
        {"device": "cpu", "ok": True, "load_s": 1.0, "generate_s": 0.2, "snippet": checked_snippet("/x/m")},
        {"device": "cuda", "ok": False, "load_s": None, "generate_s": None, "snippet": checked_snippet("/x/m", "cuda"),
         "error_type": "ValueError", "error_message": "MarlinLinear: in_features: 576 must be divisible by [64]",
         "explanation": "name a kernel that fits"}], model=REPO_ID, revision=REVISION)
    assert checks[1]["error"] == "ValueError: MarlinLinear: in_features: 576 must be divisible by [64]"
    assert checks[1]["advice"] == "name a kernel that fits" and f'"{REPO_ID}", revision=' in checks[1]["snippet"]
    matrix = "### sweep of SmolLM2\n\n| branch | KL mean |\n|---|---:|\n| `gptq-4bit-64g` ★ | 0.14 |\n"
    card = render_card(manifest=smollm2_manifest(tmp_path / "a", runnability=checks), repo_id=REPO_ID,
                       revision=REVISION, matrix_markdown=matrix)
    assert ("On a CUDA GPU — the default loading path **did not work** when checked: `ValueError: MarlinLinear: "
            "in_features: 576 must be divisible by [64]`. name a kernel that fits") in card
    assert "## Sweep" in card and "| `gptq-4bit-64g` ★ | 0.14 |" in card
    assert card.index("## Gate") < card.index("## Sweep") < card.index("## Sources")


def test_measured_values_and_names() -> None:
    manifest = {"metrics": {"fp16": {"perplexity": 10, "device": "cpu", "ok": True},
                            "ratios": {"decode_speedup": 1.5, "size_ratio": None},
                            "measured": [{"name": "task_arc_easy_acc_norm_stderr", "side": "gptq", "value": 0.01},
                                         {"name": "task_x_acc_acc", "side": "fp16", "value": 0.5},
                                         {"name": "decode_tok_s_b16", "side": "gptq", "value": 9.0},
                                         {"name": "decode_speedup_b4", "side": "delta", "value": 1.1},
                                         {"name": "perplexity", "side": "fp16", "value": 11.0}]}}
    values = measured_values(manifest)
    assert values[("perplexity", "fp16")] == 11.0  # the recorded rows win over the side record
    assert ("ok", "fp16") not in values and ("size_ratio", "delta") not in values
    assert task_names(values) == ["arc_easy", "x_acc"] and decode_batches(values) == [4, 16]


# --------------------------------------------------------------------------- local paths


def test_public_refs_scrub_and_snippet() -> None:
    assert public_ref("/a/b/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1.gguf" and public_ref("file:///s/store/") == "store"
    assert public_ref("hf://o/r") == "hf://o/r" and public_ref("o/r") == "o/r" and public_ref("s3://b/p") == "s3://b/p"
    spec, local = public_spec({"base": {"uri": "/m/base"}, "adapters": [{"uri": "hf://o/l"}],
                               "publish": {"destination": "file:///srv/store"},
                               "benchmark": {"perplexity": {"text": {"path": "/d/eval.txt", "dataset": "w"}}}},
                              known={"/m/base": "f" * 64})
    assert spec == {"base": {"uri": "base"}, "adapters": [{"uri": "hf://o/l"}], "publish": {"destination": "store"},
                    "benchmark": {"perplexity": {"text": {"path": "eval.txt", "dataset": "w"}}}}
    assert local == [{"field": "base.uri", "name": "base", "sha256": "f" * 64},
                     {"field": "benchmark.perplexity.text.path", "name": "eval.txt", "sha256": None}]
    roots = ["/home/ann", "/tmp"]
    text = "at /home/ann/w/x.gguf, file:///tmp/q/r; s3://b/tmp/x /home/anna/z (/tmp/a) `/home/ann`"
    assert scrub_text(text, roots=roots) == "at x.gguf, r; s3://b/tmp/x /home/anna/z (a) `ann`"
    assert scrub_local_paths({"/home/ann/k": ["/tmp/a/b", 1, None]}, roots=roots) == {"k": ["b", 1, None]}
    snippet = 'm = A.from_pretrained("/w/x", device_map="cuda")\nt = T.from_pretrained("o/r", revision="old")\n'
    assert retarget_snippet(snippet, model="me/q", revision="b") == (
        'm = A.from_pretrained("me/q", revision="b", device_map="cuda")\nt = T.from_pretrained("me/q", revision="b")\n')
    assert retarget_snippet(snippet, model="./q") == ('m = A.from_pretrained("./q", device_map="cuda")\n'
                                                      't = T.from_pretrained("./q")\n')


def forbidden_paths(*extra: Path) -> list[str]:
    """Paths of this machine that nothing published may name."""
    settings = get_settings()
    paths = {str(Path.home()), str(settings.resolved_work_dir), str(settings.home), str(smollm2_gguf().parent),
             sys.prefix, *site.getsitepackages(), *(str(p) for p in extra)}
    return sorted(paths | {"site-packages", "/.venv/"})


def assert_no_local_paths(text: str, forbidden: list[str], what: str) -> None:
    found = [p for p in forbidden if p in text]
    assert not found, f"{what} names {found}"


@pytest.fixture
def local_sources(tmp_path: Path):
    """A run from the SmolLM2 GGUF in site-packages with a LoRA adapter in the work dir, its artifact
    in the work dir, a local evaluation text, and a runnability check on the artifact folder."""
    with own_work_dir(tmp_path / "work") as work:
        yield _local_sources(tmp_path, work)


def _local_sources(tmp_path: Path, work: Path):
    gguf = smollm2_gguf()
    adapter = work / "finetune" / "0a1b2c" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    artifact = work / "quantize" / "3c4d5e"
    artifact.mkdir(parents=True)
    (artifact / "config.json").write_text('{"quantization_config": {"bits": 4}}')
    (artifact / "model.safetensors").write_bytes(b"\1" * 128)
    text = tmp_path / "eval" / "wiki.test.txt"
    text.parent.mkdir()
    text.write_text("The quick brown fox.\n")
    gguf_sha, adapter_sha = file_sha256(gguf), tree_sha256(adapter)

    def records(destination: str):
        spec = FactorySpec(name="smol", base={"uri": str(gguf)}, adapters=({"uri": str(adapter)},),
                           benchmark={"perplexity": {"text": {"path": str(text)}}},
                           publish={"destination": destination, "name": "SmolLM2-135M-Instruct"},
                           quantize={"bits": 4, "group_size": 64})
        base = ModelArtifact(path=str(work / "download" / "9f8e"), sha=gguf_sha, source_uri=str(gguf), kind="gguf")
        merge = MergeResult(base=base, model=base.model_copy(update={"path": str(work / "merge" / "7a6b"),
                                                                     "kind": "merged"}),
                            adapters=(AdapterArtifact(path=str(adapter), sha=adapter_sha, source_uri=str(adapter),
                                                      weight=1.0),),
                            max_abs_logit_diff=1e-5, tolerance=1e-3)
        quant = QuantResult(model=ModelArtifact(path=str(artifact), sha=content_digest(build_manifest(artifact)["files"]),
                                                source_uri=str(gguf),
                                                kind="gptq"), quantize_s=3.0, engine="gptqmodel 7.6.0", device="cpu")
        decision = GateDecision(passed=True, checks=(GateCheck(
            metric="max_ppl_increase_pct", threshold=50.0, baseline=28.76, candidate=39.5, observed=37.3, passed=True,
            message=f"perplexity +37.3 % (measured in {work / 'benchmark' / 'k1'})"),))
        checks = [RunnabilityResult(device="cpu", ok=True, snippet=checked_snippet(str(artifact)), stage="done",
                                    wall_s=3.0, load_s=1.0, generate_s=0.2, tokens=4, text=" Paris")]
        return dict(spec=spec, merge=merge, quant=quant, bench=smollm2_bench(str(work / "benchmark" / "k1")),
                    decision=decision, runnability=checks)

    forbidden = forbidden_paths(tmp_path, adapter, artifact, text)
    return records, forbidden, {"gguf": gguf, "gguf_sha": gguf_sha, "adapter_sha": adapter_sha, "artifact": artifact,
                                "text_sha": file_sha256(text)}


def test_nothing_published_names_a_local_path(local_hub, local_sources, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    records, forbidden, known = local_sources
    hub = publish_artifact(**records(f"hf://{REPO_ID}"))
    files = Path(snapshot_download(REPO_ID, revision=REVISION))
    manifest_text, card = (files / MANIFEST).read_text(), (files / "README.md").read_text()
    store = tmp_path / "store"
    stored = publish_artifact(**records(store.as_uri()))
    stored_manifest = verify_folder(local_root(stored.uri))
    for what, text in (("the Hub manifest", manifest_text), ("the model card", card),
                       ("the file store's manifest", json.dumps(stored_manifest))):
        assert_no_local_paths(text, forbidden, what)
    assert hub.destination == "hub" and stored.destination == "file"

    # local sources: their name and SHA-256; the spec keeps its shape, naming them by name
    manifest = json.loads(manifest_text)
    gguf_name = known["gguf"].name
    assert manifest["sources"]["base"] == {"uri": gguf_name, "sha": known["gguf_sha"], "local": "file"}
    assert manifest["sources"]["adapters"] == [{"source_uri": "adapter", "sha": known["adapter_sha"], "weight": 1.0,
                                                "local": "folder"}]
    assert manifest["spec"]["base"]["uri"] == gguf_name and manifest["spec"]["adapters"][0]["uri"] == "adapter"
    assert {"field": "benchmark.perplexity.text.path", "name": "wiki.test.txt",
            "sha256": known["text_sha"]} in manifest["sources"]["local"]
    assert manifest["run_key"] == step_key("run", spec=records(f"hf://{REPO_ID}")["spec"])
    assert "measured in k1" in manifest["gate"]["checks"][0]["message"]
    (check,) = manifest["runnability"]
    assert check["snippet"] == load_snippet(model=REPO_ID, revision=REVISION, device="cpu")
    assert stored_manifest["runnability"][0]["snippet"] == checked_snippet("./SmolLM2-135M-Instruct")
    assert f"GPTQ 4-bit quantization of `{gguf_name}` (local file, sha256 `{known['gguf_sha']}`)" in card
    assert f"- LoRA adapter: `adapter` (local folder, sha256 `{known['adapter_sha']}`)" in card
    assert f"`wiki.test.txt` (local, sha256 `{known['text_sha']}`)" in card

    # the published manifest still re-records its run (catalog import), under the run's own key
    with open_catalog(f"sqlite:///{tmp_path / 'fresh' / 'catalog.db'}") as fresh:
        created = import_artifact(fresh, uri=stored.uri)
        detail = fresh.get_run(created.run_id)
        assert created.action == "created" and detail.run_key == stored_manifest["run_key"]
        assert detail.base_uri == gguf_name and detail.value("perplexity", "gptq") == 39.5


def test_a_factory_run_from_local_folders_publishes_no_local_path(prefect, local_hub, tiny_llama,
                                                                  tmp_path_factory) -> None:
    """The whole flow: a local base folder and a local LoRA adapter, published to the Hub."""
    from huggingface_hub import snapshot_download

    from modelfactory.interfaces.runner import run_factory

    lora = make_lora(tiny_llama, tmp_path_factory.mktemp("local-lora"))
    repo_id = f"{OWNER}/tiny-local-gptq"
    outcome = run_factory(tiny_spec(tiny_llama, adapters=[{"uri": str(lora)}], gate=TINY_GATE,
                                    publish={"destination": f"hf://{repo_id}"}))
    assert outcome.status == "passed", outcome
    files = Path(snapshot_download(repo_id, revision="gptq-4bit-32g"))
    manifest, card = (files / MANIFEST).read_text(), (files / "README.md").read_text()
    forbidden = forbidden_paths(tiny_llama, lora, *local_roots())
    assert_no_local_paths(manifest, forbidden, "the manifest")
    assert_no_local_paths(card, forbidden, "the model card")
    published = json.loads(manifest)
    assert published["sources"]["base"]["uri"] == tiny_llama.name
    assert published["sources"]["adapters"][0]["source_uri"] == lora.name
    detail = open_catalog().get_run(outcome.run_id)  # the catalog keeps the full paths
    assert detail.base_uri == str(tiny_llama.resolve()) and detail.adapters[0]["uri"] == str(lora.resolve())
    assert published["run_key"] == detail.run_key


def test_the_run_artifact_shows_the_runnability_checks(tmp_path: Path) -> None:
    """RunRecorder.runnability records the checks as step ``runnability``; the Prefect artifact shows them."""
    from modelfactory.reports import run_markdown
    from modelfactory.tasks.record import RunRecorder

    recorder = RunRecorder.start(run_id="run-runnability-1", name="r", spec={}, run_key="k", flow_run_id=None,
                                 catalog_url=f"sqlite:///{tmp_path / 'catalog.db'}")
    recorder.runnability(RunnabilityReport(model_dir="/w/q", results=(
        RunnabilityResult(device="cpu", ok=True, snippet=checked_snippet("/w/q"), stage="done", wall_s=2.0, load_s=1.5,
                          generate_s=0.25, tokens=4),
        RunnabilityResult(device="cuda", ok=False, snippet=checked_snippet("/w/q", "cuda"), stage="load", wall_s=9.0,
                          error_type="ValueError", error_message="in_features: 576 must be divisible by [64]",
                          explanation="use group_size 64"))))
    detail = recorder.catalog.get_run("run-runnability-1")
    (step,) = [s for s in detail.steps if s.name == "runnability"]
    assert step.status == "failed" and step.detail["results"][0]["snippet"] == checked_snippet("/w/q")  # full path kept
    markdown = run_markdown(detail)
    assert "### runnability (plain transformers): failed" in markdown
    assert "| cpu | yes | 1.50 | 0.25 |  |" in markdown
    assert "| cuda | **no** |  |  | ValueError: in_features: 576 must be divisible by [64] use group_size 64 |" in markdown
