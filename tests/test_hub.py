"""Hugging Face Hub sources and publishing, through the real huggingface_hub client over HTTP
against the local Hub-compatible server in ``modelfactory/testing/hub_server.py``."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from modelfactory.core.errors import (
    DiskFullError,
    HubUnavailableError,
    PublishError,
    SourceError,
    SourceNotFoundError,
    is_transient,
)
from modelfactory.core.manifest import (
    MANIFEST,
    build_manifest,
    manifest_bytes,
    verify_folder,
)
from modelfactory.core.specs import AdapterSpec, FactorySpec, ModelSource
from modelfactory.publishing.hub import publish_hub
from modelfactory.testing.disks import small_disk
from modelfactory.testing.hub_server import (
    OWNER,
    READ_TOKEN,
    WRITE_TOKEN,
    LocalHub,
    upload_model,
)
from modelfactory.testing.models import TINY_GATE, tiny_spec

BASE_REPO = f"{OWNER}/tiny-llama"
LORA_REPO = f"{OWNER}/tiny-lora"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub_models(local_hub, tiny_llama, tiny_lora) -> dict[str, str]:
    """The tiny Llama and its LoRA on the local Hub (pushed by the real client); repo -> main commit."""
    return {BASE_REPO: upload_model(local_hub, tiny_llama, BASE_REPO),
            LORA_REPO: upload_model(local_hub, tiny_lora, LORA_REPO)}


def api(token: str | bool | None = None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def snapshot(repo_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision))


def fake_artifact(folder: Path, *, config: str = "gptq-4bit-128g", seed: int = 0, extra: bool = False,
                  desc_act: bool = False) -> tuple[Path, dict]:
    """A GPTQ-like folder (one multipart-sized LFS file, one small LFS file, JSON) and its manifest."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                    "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": desc_act}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (folder / "model.safetensors").write_bytes(rng.randbytes(5 * 1024 * 1024 + 17))  # > 4 MiB: multipart
    (folder / "extra.safetensors").write_bytes(rng.randbytes(4096))
    if extra:
        (folder / "stale.json").write_text("{}")
    spec = FactorySpec(base=ModelSource(uri=f"hf://{BASE_REPO}"),
                       adapters=(AdapterSpec(uri=f"hf://{LORA_REPO}"),),
                       quantize={"bits": 4, "group_size": 128, "desc_act": desc_act})
    side = {"device": "cpu", "dtype": "bfloat16", "kernel": "gptq_torch", "decode_mode": "eager",
            "memory_kind": "rss", "ppl_tokens": 1024}
    manifest = build_manifest(
        folder, name="tiny", config=config, key=hashlib.sha256(f"{config}{seed}".encode()).hexdigest(),
        created_at=f"2026-11-24T00:00:{seed:02d}+00:00", spec=spec.model_dump(mode="json"),
        sources={"base": {"uri": f"hf://{BASE_REPO}", "sha": "a" * 40},
                 "adapters": [{"path": "/tmp/x", "sha": "b" * 40, "source_uri": f"hf://{LORA_REPO}", "weight": 1.0}]},
        metrics={"fp16": {**side, "perplexity": 20.0, "decode_tok_s": 30.0, "ttft_ms": 40.0, "disk_bytes": 260_000_000,
                          "mem_after_load_bytes": 270_000_000, "mem_peak_bytes": 300_000_000},
                 "gptq": {**side, "perplexity": 21.0, "decode_tok_s": 45.0, "ttft_ms": 35.0, "disk_bytes": 110_000_000,
                          "mem_after_load_bytes": 60_000_000, "mem_peak_bytes": 90_000_000},
                 "ratios": {"ppl_increase_pct": 5.0, "decode_speedup": 1.5, "size_ratio": 0.423, "memory_ratio": 0.222}},
        gate={"passed": True, "checks": [{"metric": "max_ppl_increase_pct", "threshold": 10.0, "baseline": 20.0,
                                          "candidate": 21.0, "observed": 5.0, "passed": True, "message": "ok"}]},
        engine="gptqmodel 7.6.0",
    )
    return folder, manifest


def commits_to(server: LocalHub, repo_id: str, branch: str) -> list:
    return [c for c in server.calls("POST", rf"^/api/models/{repo_id}/commit/{branch}$") if c[2] == 200]


# --------------------------------------------------------------------------- download step
def test_hub_base_is_pinned_to_the_resolved_commit(local_hub, hub_models, tiny_llama, tmp_path):
    from modelfactory.tasks.download import download_model

    first = hub_models[BASE_REPO]
    artifact = download_model(source=ModelSource(uri=BASE_REPO))
    assert artifact.kind == "hub" and artifact.sha == first and artifact.source_uri == f"hf://{BASE_REPO}"
    path = Path(artifact.path)
    assert path.name == first  # the snapshot of exactly that commit
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).read_bytes() == (tiny_llama / name).read_bytes(), name

    # main moves on; an explicit revision (branch or SHA) still resolves to what it names
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    second = api(WRITE_TOKEN).upload_file(path_or_fileobj=tmp_path / "generation_config.json",
                                          path_in_repo="generation_config.json", repo_id=BASE_REPO,
                                          commit_message="generation config").oid
    moved = download_model(source=ModelSource(uri=f"hf://{BASE_REPO}"))
    assert moved.sha == second != first
    assert json.loads((Path(moved.path) / "generation_config.json").read_text())["max_new_tokens"] == 7
    pinned = download_model(source=ModelSource(uri=BASE_REPO, revision=first))
    assert pinned.sha == first and Path(pinned.path).name == first
    assert (Path(pinned.path) / "generation_config.json").read_bytes() == \
        (tiny_llama / "generation_config.json").read_bytes()


def test_adapter_from_the_hub(local_hub, hub_models):
    from modelfactory.tasks.download import resolve_adapter

    adapter = resolve_adapter(spec=AdapterSpec(uri=f"hf://{LORA_REPO}", weight=0.5))
    assert adapter.sha == hub_models[LORA_REPO] and adapter.source_uri == f"hf://{LORA_REPO}"
    assert adapter.weight == 0.5
    assert (Path(adapter.path) / "adapter_config.json").is_file()
    assert (Path(adapter.path) / "adapter_model.safetensors").is_file()


def test_nonexistent_revision_or_repo_is_a_clear_source_error(local_hub, hub_models):
    from modelfactory.tasks.download import download_model, resolve_adapter

    with pytest.raises(SourceNotFoundError) as info:
        download_model(source=ModelSource(uri=BASE_REPO, revision="no-such-branch"))
    assert isinstance(info.value, SourceError)
    assert "no-such-branch" in str(info.value) and BASE_REPO in str(info.value)
    assert "existing branch, tag or commit" in str(info.value)
    with pytest.raises(SourceNotFoundError, match=f"{OWNER}/missing-model"):
        download_model(source=ModelSource(uri=f"{OWNER}/missing-model"))
    with pytest.raises(SourceNotFoundError, match="0123456789"):
        resolve_adapter(spec=AdapterSpec(uri=f"hf://{LORA_REPO}", revision="0123456789" * 4))


def dead_endpoint() -> str:
    """The URL of a local port nobody listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_hub_while_downloading_is_transient(local_hub, hub_models, monkeypatch):
    from huggingface_hub import constants

    from modelfactory.tasks.download import download_model, resolve_adapter

    monkeypatch.setattr(constants, "ENDPOINT", dead_endpoint())
    with pytest.raises(HubUnavailableError, match=f"could not reach the Hub for Hub repo '{BASE_REPO}'") as info:
        download_model(source=ModelSource(uri=BASE_REPO))
    assert is_transient(info.value)
    with pytest.raises(HubUnavailableError, match="could not reach the Hub"):
        resolve_adapter(spec=AdapterSpec(uri=f"hf://{LORA_REPO}"))


def test_a_full_hf_cache_is_a_disk_full_error_and_not_retried(local_hub, hub_models, tmp_path, monkeypatch):
    """Only outages are transient: a full disk under the Hugging Face cache would fail every retry."""
    from huggingface_hub import constants

    from modelfactory.tasks.download import download_model

    with small_disk(tmp_path / "hf-cache", size="256k") as cache:  # the tiny model is ~2 MB
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        with pytest.raises(DiskFullError) as info:
            download_model(source=ModelSource(uri=BASE_REPO))
        message = str(info.value)
        assert not is_transient(info.value) and info.value.__cause__.errno == errno.ENOSPC
        assert BASE_REPO in message and "ran out of disk space" in message and "MB free" in message
        assert str(cache) in message and "HF_HUB_CACHE" in message


def test_a_cache_folder_the_factory_may_not_write_is_a_source_error_naming_it(local_hub, hub_models, tmp_path,
                                                                              monkeypatch):
    from huggingface_hub import constants

    from modelfactory.tasks.download import download_model

    with small_disk(tmp_path / "disk") as disk:
        cache = disk / "hub"
        cache.mkdir()
        # Immutable: even root (the tests' user) gets "Operation not permitted" (a PermissionError).
        subprocess.run(["chattr", "+i", str(cache)], check=True)
        try:
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
            with pytest.raises(SourceError) as info:
                download_model(source=ModelSource(uri=BASE_REPO))
        finally:
            subprocess.run(["chattr", "-i", str(cache)], check=True)
    message = str(info.value)
    assert isinstance(info.value.__cause__, PermissionError) and not is_transient(info.value)
    assert not isinstance(info.value, (SourceNotFoundError, DiskFullError))
    assert BASE_REPO in message and str(cache) in message and "was denied access" in message


@pytest.mark.parametrize("bad", ["a--b/c", "a/b/c", "-x/y", "a/..b", "owner"])
def test_one_repo_id_rule_for_sources_publishing_cards_and_watches(bad, tmp_path, monkeypatch):
    from modelfactory.core.errors import SpecError
    from modelfactory.core.specs import classify_source
    from modelfactory.publishing.modelcard import hub_base_model
    from modelfactory.triggers.watch import normalize_repo

    monkeypatch.chdir(tmp_path)  # "a/b/c" must not exist relative to the cwd
    source, manifest = fake_artifact(tmp_path / "a")
    for refuse in (lambda: classify_source(f"hf://{bad}"), lambda: normalize_repo(repo=bad),
                   lambda: publish_hub(source=source, repo_id=bad, revision="main", private=False, manifest=manifest)):
        with pytest.raises(SpecError, match="is not a Hugging Face repo id 'owner/name'"):
            refuse()
    assert hub_base_model(f"hf://{bad}") is None
    assert classify_source(f"hf://{BASE_REPO}") == "hub" and normalize_repo(repo=f"hf://{BASE_REPO}") == BASE_REPO


# --------------------------------------------------------------------------- publishing
@pytest.fixture(scope="module")
def published(local_hub, hub_models, tmp_path_factory):
    """One artifact published to a new private repo on branch gptq-4bit-128g."""
    source, manifest = fake_artifact(tmp_path_factory.mktemp("pub") / "a", extra=True)
    publication = publish_hub(source=source, repo_id=f"{OWNER}/tiny-gptq", revision="gptq-4bit-128g", private=True,
                              manifest=manifest)
    return publication, source, manifest


def test_publish_creates_the_private_repo_and_its_config_branch(local_hub, published):
    from huggingface_hub.errors import RepositoryNotFoundError

    publication, source, manifest = published
    repo_id = f"{OWNER}/tiny-gptq"
    assert publication.destination == "hub" and publication.reused is False
    assert publication.revision == "gptq-4bit-128g" and re.fullmatch(r"[0-9a-f]{40}", publication.commit)
    assert publication.uri == f"{local_hub.endpoint}/{repo_id}/tree/gptq-4bit-128g"
    assert publication.size_bytes == manifest["total_bytes"]
    assert api(WRITE_TOKEN).model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        api(False).model_info(repo_id)  # anonymous: private repos are invisible
    branches = {b.name: b.target_commit for b in api().list_repo_refs(repo_id).branches}
    assert branches["gptq-4bit-128g"] == publication.commit and set(branches) == {"main", "gptq-4bit-128g"}
    assert [s.rfilename for s in api().model_info(repo_id).siblings] == [".gitattributes"]  # main untouched
    assert len(commits_to(local_hub, repo_id, "gptq-4bit-128g")) == 1  # weights, card and manifest: one commit
    assert local_hub.calls("PUT", r"/lfs-storage/.+/part/\d+$")  # the 5 MB file went multipart

    files = snapshot(repo_id, "gptq-4bit-128g")
    assert verify_folder(files) == json.loads((files / MANIFEST).read_text())  # every file's sha256 matches
    assert {p.name for p in files.iterdir()} == {e["path"] for e in manifest["files"]} | {
        "README.md", MANIFEST, ".gitattributes"}
    assert hashlib.sha256((files / MANIFEST).read_bytes()).hexdigest() == publication.manifest_sha256
    assert (files / MANIFEST).read_bytes() == manifest_bytes(manifest)


def test_model_card(local_hub, published):
    from huggingface_hub import ModelCard, hf_hub_download

    publication, _, manifest = published
    text = Path(hf_hub_download(f"{OWNER}/tiny-gptq", "README.md", revision="gptq-4bit-128g")).read_text()
    card = ModelCard(text)
    assert card.data.base_model == BASE_REPO and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert {"gptq", "4-bit"} <= set(card.data.tags)
    for words in ("perplexity", "decode tok/s", "time to first token", "safetensors on disk", "memory after load",
                  "+5.0 %", "1.50×", "0.423×", "| `group_size` | `128` |", "desc_act", "damp_percent",
                  "Calibration set: 128 sequences × 512 tokens of `wikitext/wikitext-2-v1:validation`",
                  "**passed**", "max_ppl_increase_pct", "gptqmodel 7.6.0", f"hf://{LORA_REPO}",
                  f'AutoModelForCausalLM.from_pretrained("{OWNER}/tiny-gptq", revision="gptq-4bit-128g"',
                  f"vllm serve {OWNER}/tiny-gptq --revision gptq-4bit-128g",
                  f'LLM(model="{OWNER}/tiny-gptq", revision="gptq-4bit-128g")'):
        assert words in card.text, words
    assert WRITE_TOKEN not in text and "hf_" not in text and "/tmp/x" not in text


def test_card_redacts_credentials():
    from modelfactory.core.secrets import redact

    text = redact("s3://AKIA:secret@minio/x https://h/f?X-Amz-Signature=abc&x=1 hf_abcdefghijklmnopqrstu T0K",
                  secrets=["T0K"])
    assert "secret" not in text and "abc" not in text and "hf_abcdef" not in text and "T0K" not in text


def test_each_config_gets_its_own_branch(local_hub, published, tmp_path):
    first, _, _ = published
    repo_id = f"{OWNER}/tiny-gptq"
    source, manifest = fake_artifact(tmp_path / "b", config="gptq-4bit-32g-actorder", seed=1, desc_act=True)
    other = publish_hub(source=source, repo_id=repo_id, revision="gptq-4bit-32g-actorder", private=True,
                        manifest=manifest)
    branches = {b.name: b.target_commit for b in api().list_repo_refs(repo_id).branches}
    assert branches == {"main": branches["main"], "gptq-4bit-128g": first.commit,
                        "gptq-4bit-32g-actorder": other.commit}
    on_branch = json.loads((snapshot(repo_id, "gptq-4bit-32g-actorder") / MANIFEST).read_text())
    assert on_branch["config"] == "gptq-4bit-32g-actorder" and on_branch["spec"]["quantize"]["desc_act"] is True
    assert "act-order" in (snapshot(repo_id, "gptq-4bit-32g-actorder") / "README.md").read_text()


def test_republishing_is_a_no_op_and_a_changed_artifact_replaces_the_branch(local_hub, published, tmp_path):
    first, source, manifest = published
    repo_id = f"{OWNER}/tiny-gptq"
    before = len(commits_to(local_hub, repo_id, "gptq-4bit-128g"))
    again = publish_hub(source=source, repo_id=repo_id, revision="gptq-4bit-128g", private=True,
                        manifest={**manifest, "created_at": "2026-12-01T00:00:00+00:00"})  # same artifact, later
    assert again.reused is True and again.commit == first.commit
    assert again.manifest_sha256 == first.manifest_sha256 and again.uri == first.uri
    assert len(commits_to(local_hub, repo_id, "gptq-4bit-128g")) == before  # nothing pushed

    changed, new_manifest = fake_artifact(tmp_path / "c", seed=2)  # new weights, no stale.json
    third = publish_hub(source=changed, repo_id=repo_id, revision="gptq-4bit-128g", private=True,
                        manifest=new_manifest)
    assert third.reused is False and third.commit != first.commit
    files = snapshot(repo_id, "gptq-4bit-128g")
    assert not (files / "stale.json").exists()  # files of the old artifact are gone, in the same commit
    assert verify_folder(files)["key"] == new_manifest["key"]
    assert len(commits_to(local_hub, repo_id, "gptq-4bit-128g")) == before + 1


def test_wrong_or_missing_token_is_a_clear_publish_error(local_hub, hub_models, tmp_path, monkeypatch):
    source, manifest = fake_artifact(tmp_path / "a")
    kwargs = dict(source=source, repo_id=f"{OWNER}/tiny-token", revision="gptq-4bit-128g", private=False,
                  manifest=manifest)
    bad = "hf_thisTokenIsWrong0000000000000000"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(PublishError) as info:
        publish_hub(**kwargs)
    message = str(info.value)
    assert f"{OWNER}/tiny-token" in message and "check the token" in message and "HTTP 401" in message
    assert bad not in message and not is_transient(info.value)

    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)  # valid, but read-only
    with pytest.raises(PublishError, match=r"HTTP 403.*check the token"):
        publish_hub(**kwargs)

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="needs a write token: set HF_TOKEN"):
        publish_hub(**kwargs)
    assert f"{OWNER}/tiny-token" not in local_hub.store.repos  # nothing was created


def test_private_requested_for_an_existing_public_repo_is_refused(local_hub, hub_models, tmp_path):
    source, manifest = fake_artifact(tmp_path / "a")
    with pytest.raises(PublishError, match=f"{BASE_REPO}.*is public, but publish.private is true"):
        publish_hub(source=source, repo_id=BASE_REPO, revision="gptq-4bit-128g", private=True, manifest=manifest)


@pytest.mark.parametrize("status", [503, 429])
def test_hub_5xx_and_rate_limit_are_transient(local_hub, hub_models, tmp_path, status):
    source, manifest = fake_artifact(tmp_path / "a")
    local_hub.fail_next("POST", r"^/api/repos/create$", status)
    with pytest.raises(HubUnavailableError, match=f"HTTP {status}") as info:
        publish_hub(source=source, repo_id=f"{OWNER}/tiny-flaky", revision="gptq-4bit-128g", private=False,
                    manifest=manifest)
    assert is_transient(info.value) and f"{OWNER}/tiny-flaky" in str(info.value)


def test_unreachable_hub_is_transient(local_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", dead_endpoint())
    source, manifest = fake_artifact(tmp_path / "a")
    with pytest.raises(HubUnavailableError, match="could not reach the Hub") as info:
        publish_hub(source=source, repo_id=f"{OWNER}/tiny-down", revision="gptq-4bit-128g", private=False,
                    manifest=manifest)
    assert is_transient(info.value)


def test_token_from_a_prefect_secret_block(prefect, local_hub, hub_models, tmp_path, set_env, caplog):
    from prefect.blocks.system import Secret

    Secret(value=WRITE_TOKEN).save("mf-test-hf-token", overwrite=True)
    set_env(HF_TOKEN=None, MODELFACTORY_HF_TOKEN_SECRET="mf-test-hf-token")
    source, manifest = fake_artifact(tmp_path / "a")
    with caplog.at_level("DEBUG"):
        publication = publish_hub(source=source, repo_id=f"{OWNER}/tiny-secret", revision="gptq-4bit-128g",
                                  private=False, manifest=manifest)
    assert publication.reused is False
    assert WRITE_TOKEN not in caplog.text and WRITE_TOKEN not in publication.model_dump_json()

    set_env(MODELFACTORY_HF_TOKEN_SECRET="mf-no-such-block")
    with pytest.raises(PublishError, match="'mf-no-such-block'.*could not be loaded"):
        publish_hub(source=source, repo_id=f"{OWNER}/tiny-secret", revision="gptq-4bit-128g", private=False,
                    manifest=manifest)


# --------------------------------------------------------------------------- the whole factory
def test_factory_downloads_from_the_hub_and_publishes_to_it(prefect, local_hub, hub_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelfactory.catalog import open_catalog
    from modelfactory.interfaces.runner import run_factory

    repo_id = f"{OWNER}/tiny-llama-gptq"
    base_sha = api().model_info(BASE_REPO).sha  # main's head (another test may have moved it)
    spec = tiny_spec(BASE_REPO, adapters=[{"uri": f"hf://{LORA_REPO}"}],
                     gate=TINY_GATE, publish={"destination": f"hf://{repo_id}", "private": True})
    outcome = run_factory(spec)
    assert outcome.status == "passed", outcome
    assert outcome.artifact_uri == f"{local_hub.endpoint}/{repo_id}/tree/gptq-4bit-32g"
    detail = open_catalog().get_run(outcome.run_id)
    assert detail.base_sha == base_sha and detail.adapters[0]["sha"] == hub_models[LORA_REPO]
    publications = getattr(detail, "publications", ())
    if publications:  # the catalog's publications table (lead's change) — checked when present
        (pub,) = publications
        assert pub.destination == "hub" and pub.revision == "gptq-4bit-32g" and pub.reused is False

    files = snapshot(repo_id, "gptq-4bit-32g")
    manifest = verify_folder(files)
    assert manifest["sources"]["base"] == {"uri": f"hf://{BASE_REPO}", "sha": base_sha}
    assert {"config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"} <= {
        f["path"] for f in manifest["files"]}
    card = (files / "README.md").read_text()
    assert f"base_model: {BASE_REPO}" in card and "base_model_relation: quantized" in card
    model = AutoModelForCausalLM.from_pretrained(files, dtype=torch.bfloat16, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(files)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False)
    assert out.shape[1] == len(tokenizer("Hello")["input_ids"]) + 4

    again = run_factory(spec)  # identical run: every step reused, nothing pushed
    assert again.status == "passed" and again.artifact_uri == outcome.artifact_uri
    steps = {s.name: s.status for s in open_catalog().get_run(again.run_id).steps}
    assert steps["quantize"] == steps["publish"] == "reused"
    assert len(commits_to(local_hub, repo_id, "gptq-4bit-32g")) == 1
