"""Step 1 — download: resolve a base model (or adapter) to a local folder and a pinned identity.

- Hub repo id → commit SHA (``HfApi.model_info``) → ``snapshot_download`` of exactly that SHA.
- Local folder → sha256 content hash of its files.
- ``.gguf`` file → dequantized by transformers, saved as fp16 safetensors under a key derived
  from the file's sha256 (reused on the next run).
- ``s3://bucket/prefix`` → downloaded into the keyed work dir, identified by the prefix's
  ``manifest.json`` sha256 when it has one (every file checked), else by its listing (keys,
  sizes, ETags); reused on the next run (``modelfactory/s3/fetch.py``).

With a stage store (``modelfactory/stage_store``) the model folder is uploaded there (once per
content) and the artifact's ``path`` is its ``s3://`` URI, which other hosts fetch.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from modelfactory import stage_store
from modelfactory.core import workdir
from modelfactory.core.errors import SourceError, SourceNotFoundError
from modelfactory.core.hashing import file_sha256, step_key, tree_sha256
from modelfactory.core.log import progress
from modelfactory.core.records import AdapterArtifact, ModelArtifact
from modelfactory.core.retries import retry_transient
from modelfactory.core.specs import AdapterSpec, ModelSource, classify_source
from modelfactory.sources.gguf import dequantize_gguf
from modelfactory.sources.hub import download_hub, resolve_hub_revision
from modelfactory.sources.model_dir import check_model_dir


def _from_gguf(path: Path) -> ModelArtifact:
    if not path.is_file():
        raise SourceNotFoundError(f"GGUF file {str(path)!r} does not exist: fix the base model path")
    progress(f"download: hashing {path.name}")
    sha = file_sha256(path)
    key = step_key("gguf", sha=sha)
    done = stage_store.find("download", key)
    reused = done is not None
    if not reused:
        progress(f"download: dequantizing {path.name} to fp16 safetensors")
        with workdir.building("download", key) as (tmp, marker):
            dequantize_gguf(gguf_path=path, out_dir=tmp)
            marker.update(source=str(path), sha256=sha)
        done = stage_store.publish("download", key)
    return ModelArtifact(path=done.uri, sha=sha, source_uri=str(path), kind="gguf", reused=reused)


def _shared(artifact: ModelArtifact) -> ModelArtifact:
    """With a stage store, the model folder by the URI other hosts fetch it by (uploaded once per content)."""
    if artifact.kind == "gguf" or not stage_store.configured():  # a gguf output is a step output already
        return artifact
    key = step_key("source", kind=artifact.kind, sha=artifact.sha)
    uri = stage_store.share(Path(artifact.path), step="download", key=key,
                            marker={"source": artifact.source_uri, "sha": artifact.sha, "kind": artifact.kind})
    return artifact.model_copy(update={"path": uri})


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
        sha = resolve_hub_revision(repo_id=source.repo_id, revision=source.revision)
        progress(f"download: {source.repo_id}@{source.revision or 'main'} is commit {sha}")
        path = download_hub(repo_id=source.repo_id, sha=sha)
        artifact = ModelArtifact(path=str(path), sha=sha, source_uri=f"hf://{source.repo_id}", kind="hub")
    check_model_dir(stage_store.resolve(artifact.path), trust_remote_code=trust_remote_code)
    return _shared(artifact).model_copy(update={"duration_s": time.perf_counter() - start})


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
        sha = resolve_hub_revision(repo_id=repo_id, revision=spec.revision)
        path, uri = download_hub(repo_id=repo_id, sha=sha), f"hf://{repo_id}"
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
