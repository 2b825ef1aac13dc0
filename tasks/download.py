"""Step 1 — download: resolve a base model (or adapter) to a local folder and a pinned identity.

- Hub repo id → commit SHA (``HfApi.model_info``) → ``snapshot_download`` of exactly that SHA.
- Local folder → sha256 content hash of its files.
- ``.gguf`` file → dequantized by transformers, saved as fp16 safetensors under a key derived
  from the file's sha256 (reused on the next run).
- ``s3://bucket/prefix`` → downloaded into the keyed work dir, identified by the prefix's
  ``manifest.json`` sha256 when it has one (every file checked), else by its listing (keys,
  sizes, ETags); reused on the next run (``modelfactory/s3/fetch.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import task

from modelfactory import workdir
from modelfactory.errors import HubUnavailableError, SourceError, SourceNotFoundError, SpecError
from modelfactory.hashing import file_sha256, step_key, tree_sha256
from modelfactory.log import progress
from modelfactory.prefect_utils import retry_transient
from modelfactory.records import AdapterArtifact, ModelArtifact
from modelfactory.specs import AdapterSpec, ModelSource, classify_source

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


# --------------------------------------------------------------------------- Hub
def hub_token() -> str | None:
    """The token for Hub reads: the Secret block named by ``MODELFACTORY_HF_TOKEN_SECRET``, else
    ``HF_TOKEN`` / the saved login (``None``: anonymous, enough for public repos)."""
    from modelfactory.settings import get_settings

    if get_settings().hf_token_secret:
        from modelfactory.hub_auth import publish_token

        return publish_token()
    return None  # huggingface_hub falls back to HF_TOKEN / the saved login itself


def _hub_failure(exc: Exception, *, what: str) -> Exception:
    """Map a huggingface_hub failure to the factory's errors: only outages are transient."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status in (401, 403):
        return SourceError(
            f"the Hub refused access to {what} ({status}: {reason}): check the token (HF_TOKEN or the "
            f"Secret block named by MODELFACTORY_HF_TOKEN_SECRET) and that it may read this repo"
        )
    if status == 404:
        return SourceNotFoundError(f"{what} was not found on the Hub ({reason}): check the repo id and revision")
    if status is None or status == 429 or status >= 500:
        return HubUnavailableError(f"could not reach the Hub for {what} ({reason}); retrying may help")
    return SourceError(f"the Hub answered {status} for {what} ({reason})")


def resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit SHA that *revision* (default: main) of *repo_id* points at."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(token=hub_token()).model_info(repo_id, revision=revision)
    except RevisionNotFoundError as exc:
        raise SourceNotFoundError(
            f"revision {revision!r} of Hub repo {repo_id!r} does not exist: use an existing branch, tag or commit"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceNotFoundError(
            f"Hub repo {repo_id!r} does not exist or is private: check the id, or set HF_TOKEN for private repos"
        ) from exc
    except HFValidationError as exc:
        raise SpecError(f"malformed Hugging Face repo id {repo_id!r}: {exc}") from exc
    except OSError as exc:  # HTTP errors and connection errors
        raise _hub_failure(exc, what=f"{repo_id!r}") from exc
    if not info.sha:
        raise SourceError(f"the Hub returned no commit SHA for {repo_id!r}@{revision}: try an explicit revision")
    return info.sha


def download_hub(repo_id: str, sha: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=sha, allow_patterns=MODEL_PATTERNS, token=hub_token()))
    except OSError as exc:
        raise _hub_failure(exc, what=f"{repo_id}@{sha[:12]}") from exc


def check_model_dir(path: Path, *, trust_remote_code: bool) -> dict:
    """Fail early, with a clear message, on folders that are not loadable causal-LM checkpoints."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{str(path)!r} has no config.json: point at a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            f"model at {str(path)!r} ships its own Python code (auto_map in config.json); "
            "set trust_remote_code: true in the spec only if you trust its author"
        )
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")]
        detail = f" (found pickled {pickled[:3]}; convert them to safetensors)" if pickled else ""
        raise SourceError(f"{str(path)!r} has no .safetensors weights{detail}")
    return config


# --------------------------------------------------------------------------- GGUF
def dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file through transformers (dequantized) and save dense fp16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16)
    # The weights are dense now, but transformers keeps the GGUF quantizer attached and then
    # refuses save_pretrained ("quantized with GGUF and is not serializable").
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    # transformers maps GGUF's EOS to <|im_start|>; the model config carries the GGUF's own id.
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _from_gguf(path: Path) -> ModelArtifact:
    if not path.is_file():
        raise SourceNotFoundError(f"GGUF file {str(path)!r} does not exist: fix the base model path")
    progress(f"download: hashing {path.name}")
    sha = file_sha256(path)
    key = step_key("gguf", sha=sha)
    done = workdir.completed("download", key)
    reused = done is not None
    if not reused:
        progress(f"download: dequantizing {path.name} to fp16 safetensors")
        with workdir.building("download", key) as (tmp, marker):
            dequantize_gguf(path, tmp)
            marker.update(source=str(path), sha256=sha)
        done = workdir.step_dir("download", key)
    return ModelArtifact(path=str(done), sha=sha, source_uri=str(path), kind="gguf", reused=reused)


# --------------------------------------------------------------------------- entry points
def download_model(*, source: ModelSource, trust_remote_code: bool = False) -> ModelArtifact:
    """Resolve *source* to a local model folder plus its pinned SHA / content hash."""
    start = time.perf_counter()
    kind = classify_source(source.uri)
    if kind == "s3":
        from modelfactory.s3 import fetch_source

        path, sha, reused = fetch_source(url=source.uri, what="base model")
        artifact = ModelArtifact(path=str(path), sha=sha, source_uri=source.uri, kind="s3", reused=reused)
    elif kind == "gguf":
        artifact = _from_gguf(Path(source.uri).expanduser())
    elif kind == "local":
        path = Path(source.uri).expanduser().resolve()
        if not path.is_dir():
            raise SourceNotFoundError(f"base model folder {source.uri!r} does not exist: fix the path")
        progress(f"download: hashing local model {path}")
        artifact = ModelArtifact(path=str(path), sha=tree_sha256(path), source_uri=str(path), kind="local")
    else:
        sha = resolve_hub_revision(source.repo_id, source.revision)
        progress(f"download: {source.repo_id}@{source.revision or 'main'} is commit {sha}")
        path = download_hub(source.repo_id, sha)
        artifact = ModelArtifact(path=str(path), sha=sha, source_uri=f"hf://{source.repo_id}", kind="hub")
    check_model_dir(Path(artifact.path), trust_remote_code=trust_remote_code)
    return artifact.model_copy(update={"duration_s": time.perf_counter() - start})


def resolve_adapter(*, spec: AdapterSpec) -> AdapterArtifact:
    """Resolve a LoRA adapter to a local folder holding ``adapter_config.json``."""
    kind = classify_source(spec.uri)
    if kind == "local":
        path = Path(spec.uri).expanduser().resolve()
        if not path.is_dir():
            raise SourceNotFoundError(f"adapter folder {spec.uri!r} does not exist: fix the adapter path")
        sha, uri = tree_sha256(path), str(path)
    elif kind == "hub":
        repo_id = spec.uri.removeprefix("hf://")
        sha = resolve_hub_revision(repo_id, spec.revision)
        path, uri = download_hub(repo_id, sha), f"hf://{repo_id}"
    elif kind == "s3":
        from modelfactory.s3 import fetch_source

        path, sha, _ = fetch_source(url=spec.uri, what="adapter")
        uri = spec.uri
    else:
        raise SourceError(f"adapter {spec.uri!r}: only local folders, Hub repos and s3:// prefixes are supported")
    if not (path / "adapter_config.json").is_file():
        raise SourceError(
            f"adapter {spec.uri!r} has no adapter_config.json: point at a folder saved by peft's save_pretrained"
        )
    return AdapterArtifact(path=str(path), sha=sha, source_uri=uri, weight=spec.weight)


@task(name="download", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_transient)
def download_task(source: ModelSource, trust_remote_code: bool = False) -> ModelArtifact:
    return download_model(source=source, trust_remote_code=trust_remote_code)


@task(name="resolve-adapter", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_transient)
def resolve_adapter_task(spec: AdapterSpec) -> AdapterArtifact:
    return resolve_adapter(spec=spec)
