"""Step 6 — publish: send a *passing* quantized model to its destination, manifest last.

The destination (``publish.destination``, else ``MODELFACTORY_STORE_URL``) picks the publisher by its
scheme: ``file://`` or a path (:mod:`modelfactory.publishing.local`), ``s3://``
(:mod:`modelfactory.publishing.s3`) or ``hf://`` (:mod:`modelfactory.publishing.hub`).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from prefect import task

from modelfactory import stage_store
from modelfactory.core.errors import PublishError
from modelfactory.core.log import progress
from modelfactory.core.manifest import build_manifest
from modelfactory.core.records import (
    BenchmarkResult,
    GateDecision,
    MergeResult,
    Publication,
    QuantResult,
)
from modelfactory.core.retries import retry_transient
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import FactorySpec
from modelfactory.publishing.destinations import destination_kind
from modelfactory.publishing.local import local_root, publish_local


def artifact_name(spec: FactorySpec) -> str:
    """``publish.name``, else the base model's name (repo name, folder name or GGUF stem)."""
    if spec.publish.name:
        return spec.publish.name
    raw = Path(spec.base.uri.rstrip("/")).name
    raw = re.sub(r"\.gguf$", "", raw, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", raw).strip(".-") or "model"
    return name[:96]


def publish_artifact(*, spec: FactorySpec, merge: MergeResult, quant: QuantResult, bench: BenchmarkResult,
                     decision: GateDecision, matrix_markdown: str | None = None) -> Publication:
    """Publish a passing build; *matrix_markdown* (a sweep's matrix) goes into a Hub model card."""
    if not decision.passed:
        raise PublishError(f"refusing to publish {quant.model.path}: the gate {decision.summary()}")
    destination = spec.publish.destination or get_settings().resolved_store_url
    config = quant.spec_label(spec.quantize)  # the resolved group size, not 'auto'
    parts = (artifact_name(spec), config, quant.model.sha)
    source = stage_store.resolve(quant.model.path)  # fetched (and checked) when quantized on another host
    manifest = build_manifest(
        source,
        name=parts[0], config=parts[1], key=parts[2],
        created_at=datetime.now(timezone.utc).isoformat(),
        spec=spec.model_dump(mode="json"),
        sources={"base": {"uri": merge.base.source_uri, "sha": merge.base.sha},
                 "adapters": [a.model_dump(mode="json") for a in merge.adapters]},
        metrics={"fp16": bench.fp16.model_dump(mode="json"), "gptq": bench.gptq.model_dump(mode="json"),
                 "ratios": bench.ratios()},
        gate=decision.model_dump(mode="json"),
        engine=quant.engine,
    )
    progress(f"publish: {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB -> {destination}")
    return publish_to(destination=destination, source=source, parts=parts, manifest=manifest,
                      private=spec.publish.private, revision=spec.publish.revision or config,
                      matrix_markdown=matrix_markdown)


def publish_to(*, destination: str, source: Path, parts: tuple[str, str, str], manifest: dict, private: bool,
               revision: str, matrix_markdown: str | None = None) -> Publication:
    """Send *source* to *destination* by its scheme: ``file://`` (or a path), ``s3://`` or ``hf://``."""
    kind = destination_kind(destination)
    if kind == "s3":
        from modelfactory.publishing.s3 import publish_s3

        return publish_s3(source=source, url=destination, parts=parts, manifest=manifest)
    if kind == "hub":
        from modelfactory.publishing.hub import publish_hub

        repo_id = destination.removeprefix("hf://").strip("/")
        return publish_hub(source=source, repo_id=repo_id, revision=revision, private=private, manifest=manifest,
                           matrix_markdown=matrix_markdown)
    folder, digest, reused = publish_local(source=source, root=local_root(destination), parts=parts,
                                           manifest=manifest)
    return Publication(uri=folder.resolve().as_uri(), manifest_sha256=digest, size_bytes=manifest["total_bytes"],
                       reused=reused, destination="file")


#: Publishing is idempotent (content-keyed, manifest last), so transient failures are safe to retry.
PUBLISH_RETRY_DELAYS_S = [5, 20, 60]


@task(name="publish", retries=len(PUBLISH_RETRY_DELAYS_S), retry_delay_seconds=PUBLISH_RETRY_DELAYS_S,
      retry_condition_fn=retry_transient)
def publish_task(spec: FactorySpec, merge: MergeResult, quant: QuantResult, bench: BenchmarkResult,
                 decision: GateDecision, matrix_markdown: str | None = None) -> Publication:
    return publish_artifact(spec=spec, merge=merge, quant=quant, bench=bench, decision=decision,
                            matrix_markdown=matrix_markdown)
