"""Step 1, download: resolving base models from local folders, and the early checks on what they
contain (no network), up to corrupted weights failing a whole run clearly.

Hub and S3 sources: test_hub.py and test_s3.py; text datasets: test_textdata.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfactory.core.errors import SourceError, SourceNotFoundError
from modelfactory.core.hashing import tree_sha256
from modelfactory.core.specs import ModelSource
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.catalog import latest_run
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import tiny_spec
from modelfactory.tasks.download import check_model_dir, download_model


def fake_model_dir(folder: Path, *, config: dict | None = None, safetensors: bool = True) -> Path:
    """A folder with a config.json and (optionally) a real, one-tensor safetensors file."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    if safetensors:
        save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return folder


def test_local_folder_resolves_to_content_hash(tiny_llama):
    artifact = download_model(source=ModelSource(uri=str(tiny_llama)))
    assert artifact.kind == "local"
    assert artifact.path == str(tiny_llama.resolve())
    assert artifact.source_uri == str(tiny_llama.resolve())
    assert artifact.sha == tree_sha256(tiny_llama)
    assert len(artifact.sha) == 64 and int(artifact.sha, 16) >= 0
    assert artifact.duration_s >= 0 and artifact.reused is False
    assert download_model(source=ModelSource(uri=str(tiny_llama))).sha == artifact.sha


def test_local_hash_follows_content(tmp_path):
    folder = fake_model_dir(tmp_path / "m")
    first = download_model(source=ModelSource(uri=str(folder))).sha
    (folder / "generation_config.json").write_text("{}")
    assert download_model(source=ModelSource(uri=str(folder))).sha != first


def test_nonexistent_folder(tmp_path):
    with pytest.raises(SourceNotFoundError, match="does not exist") as info:
        download_model(source=ModelSource(uri=str(tmp_path / "missing-model")))
    assert "missing-model" in str(info.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        download_model(source=ModelSource(uri=str(tmp_path)))


def test_remote_code_needs_trust(tmp_path):
    config = {"architectures": ["MyModel"], "auto_map": {"AutoModelForCausalLM": "modeling_my.MyModel"}}
    folder = fake_model_dir(tmp_path / "custom", config=config)
    with pytest.raises(SourceError, match="trust_remote_code") as info:
        download_model(source=ModelSource(uri=str(folder)))
    assert "auto_map" in str(info.value)
    artifact = download_model(source=ModelSource(uri=str(folder)), trust_remote_code=True)
    assert artifact.kind == "local"


def test_pickled_weights_only(tmp_path):
    folder = fake_model_dir(tmp_path / "pickled", safetensors=False)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceError, match="safetensors") as info:
        download_model(source=ModelSource(uri=str(folder)))
    assert "pytorch_model.bin" in str(info.value)


def test_no_weights_at_all(tmp_path):
    folder = fake_model_dir(tmp_path / "empty", safetensors=False)
    with pytest.raises(SourceError, match="no .safetensors weights"):
        check_model_dir(folder, trust_remote_code=False)


def test_s3_source_without_credentials_fails_clearly(monkeypatch, tmp_path):
    """s3:// sources work (tests/test_s3.py); with no AWS credentials at all the error says so."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError, match="s3://bucket/models/llama.*no usable AWS credentials") as info:
        download_model(source=ModelSource(uri="s3://bucket/models/llama"))
    assert not isinstance(info.value, SourceNotFoundError)


def test_missing_gguf(tmp_path):
    with pytest.raises(SourceNotFoundError, match="GGUF file .* does not exist"):
        download_model(source=ModelSource(uri=str(tmp_path / "model.Q4_K_M.gguf")))


# --------------------------------------------------------------------------- corrupted weights


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbled header":
        path.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    elif how == "not safetensors":
        path.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")


@pytest.mark.parametrize("how", ["truncated", "garbled header", "not safetensors"])
def test_corrupted_safetensors_fail_the_run_clearly(prefect, tiny_llama, tmp_path, how):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    _corrupt(base / "model.safetensors", how)
    with own_work_dir(tmp_path / "work"):
        with pytest.raises(SourceError, match="model.safetensors is corrupted") as info:
            run_factory(tiny_spec(base, name="corrupt"))
    assert "download or save the model again" in str(info.value)
    detail = latest_run()
    assert (detail.status, detail.error_kind) == ("failed", "source")
    assert not detail.artifacts


def test_sound_checkpoints_pass_the_structure_check(tiny_llama):
    from modelfactory.sources.safetensors_check import safetensors_problem

    assert safetensors_problem(tiny_llama / "model.safetensors") is None
