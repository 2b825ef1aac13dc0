"""Step 6 — publish: send a *passing* quantized model to its destination, manifest last.

The destination (``publish.destination``, else ``MODELFACTORY_STORE_URL``) picks the publisher by its
scheme: ``file://`` or a path (:mod:`modelfactory.publishing.local`), ``s3://``
(:mod:`modelfactory.publishing.s3`) or ``hf://`` (:mod:`modelfactory.publishing.hub`).

The manifest names no path of this machine (:mod:`modelfactory.publishing.public`): local sources
go out as their file or folder name plus SHA-256, the runnability check's "Load it" code loads the
published model, and any other string naming a local path keeps only its last component.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task

from modelfactory import stage_store
from modelfactory.benchmark.runnability import RunnabilityResult, check_entry
from modelfactory.catalog.metrics import manifest_metrics
from modelfactory.core.errors import PublishError
from modelfactory.core.hashing import step_key
from modelfactory.core.log import progress
from modelfactory.core.manifest import build_manifest, check_content
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
from modelfactory.publishing.public import (
    is_local_ref,
    local_roots,
    public_ref,
    public_spec,
    retarget_snippet,
    scrub_local_paths,
)


def artifact_name(spec: FactorySpec) -> str:
    """``publish.name``, else the base model's name (repo name, folder name or GGUF stem)."""
    if spec.publish.name:
        return spec.publish.name
    raw = Path(spec.base.uri.rstrip("/")).name
    raw = re.sub(r"\.gguf$", "", raw, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", raw).strip(".-") or "model"
    return name[:96]


def publish_artifact(*, spec: FactorySpec, merge: MergeResult, quant: QuantResult, bench: BenchmarkResult,
                     decision: GateDecision, runnability: Sequence[Any] = (),
                     matrix_markdown: str | None = None) -> Publication:
    """Publish *quant*'s model with its manifest (and, on the Hub, its model card).

    What is published is what was measured: the files must have the content digest the quantized
    model is identified by (``quant.model.sha``, which keyed its benchmark), else nothing is published.
    The artifact's key is that digest, and the manifest says it (``content_sha256``).

    *runnability*: the plain-transformers checks of the artifact (records or dicts with ``device``,
    ``ok``, ``load_s``, ``generate_s``, ``snippet`` and the error / explanation), published so the
    card's "Load it" code is the code that was checked; *matrix_markdown*: a sweep's matrix for the card.
    """
    if not decision.passed:
        raise PublishError(f"refusing to publish {quant.model.path}: the gate {decision.summary()}")
    destination = spec.publish.destination or get_settings().resolved_store_url
    config = quant.spec_label(spec.quantize)  # the resolved group size, not 'auto'
    parts = (artifact_name(spec), config, quant.model.sha)
    source = stage_store.resolve(quant.model.path)  # fetched (and checked) when quantized on another host
    revision = spec.publish.revision or config
    if destination_kind(destination) == "hub":
        model, model_revision = destination.removeprefix("hf://").strip("/"), revision
    else:  # the folder a user downloads the artifact into (modelfactory artifact download URI ./NAME)
        model, model_revision = f"./{parts[0]}", None
    manifest = build_manifest(
        source,
        name=parts[0], config=parts[1], key=parts[2],
        created_at=datetime.now(timezone.utc).isoformat(),
        # What was measured: the content digest of the files the benchmark loaded (the quantized model's
        # identity, which keys its benchmark); readers check the files against it (core.manifest.check_content).
        content_sha256=quant.model.sha,
        **manifest_fields(spec=spec, merge=merge, quant=quant, bench=bench, decision=decision,
                          runnability=runnability_entries(runnability, model=model, revision=model_revision)),
    )
    check_content(manifest, where=f"the quantized model {quant.model.path} to publish")
    # step outputs may be s3:// URIs (a stage store): only local folders are roots
    manifest = scrub_local_paths(manifest, roots=local_roots(source, quant.model.path, merge.base.path,
                                                             *(a.path for a in merge.adapters)))
    progress(f"publish: {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB -> {destination}")
    publication = publish_to(destination=destination, source=source, parts=parts, manifest=manifest,
                             private=spec.publish.private, revision=revision, matrix_markdown=matrix_markdown)
    return publication.model_copy(update={"content_sha256": manifest["content_sha256"]})


def manifest_fields(*, spec: FactorySpec, merge: MergeResult, quant: QuantResult, bench: BenchmarkResult,
                    decision: GateDecision, runnability: list[dict[str, Any]]) -> dict[str, Any]:
    """What a manifest says besides its files: spec, sources, metrics, gate, runnability, engine.

    Local sources appear by name + SHA-256 (``sources.local`` lists every local path the spec
    named, with its hash); ``run_key`` lets ``catalog import`` find the run although the published
    spec no longer names the local paths it was keyed on. A ``group_size: auto`` is published as the
    size used (``auto_resolved`` says so).
    """
    known = {merge.base.source_uri: merge.base.sha, spec.base.uri: merge.base.sha}
    known |= {a.source_uri: a.sha for a in merge.adapters}
    known |= {s.uri: a.sha for s, a in zip(spec.adapters, merge.adapters, strict=False)}
    spec_json = spec.model_dump(mode="json")
    resolved = quant.group_size is not None and spec.quantize.group_size == "auto"
    if resolved:  # the spec as run: the group size the quantize step chose (the run key keeps 'auto')
        spec_json["quantize"] = spec.quantize.resolved(quant.group_size).model_dump(mode="json")
    published_spec, local = public_spec(spec_json, known=known)
    sources: dict[str, Any] = {"base": _public_source({"uri": merge.base.source_uri, "sha": merge.base.sha}, "uri"),
                               "adapters": [_public_source({"source_uri": a.source_uri, "sha": a.sha,
                                                            "weight": a.weight}, "source_uri")
                                            for a in merge.adapters]}
    if local:
        sources["local"] = local
    fields: dict[str, Any] = {
        "spec": published_spec,
        "run_key": step_key("run", spec=spec),
        "sources": sources,
        "metrics": manifest_metrics(bench),
        "gate": decision.model_dump(mode="json"),
        "engine": quant.engine,
    }
    if bench.agreement is not None:  # KL / top-1 with their method and the kernel that produced them
        fields["agreement"] = bench.agreement.model_dump(mode="json")
    if resolved:
        fields["auto_resolved"] = {"quantize": ["group_size"]}
    if runnability:
        fields["runnability"] = runnability
    return fields


def _public_source(entry: dict[str, Any], key: str) -> dict[str, Any]:
    """A base model / adapter entry naming a local source by its file or folder name (``local``
    says which; ``sha`` is its SHA-256); Hub and S3 sources unchanged."""
    ref = entry[key]
    if not is_local_ref(ref):
        return entry
    kind = "file" if Path(ref).expanduser().is_file() or ref.lower().endswith(".gguf") else "folder"
    return {**entry, key: public_ref(ref), "local": kind}


def runnability_entries(results: Sequence[Any], *, model: str | None = None,
                        revision: str | None = None) -> list[dict[str, Any]]:
    """The runnability checks as manifest entries ``{device, ok, load_s, generate_s, error, advice, snippet}``
    (:meth:`RunnabilityResult.entry`); with *model*, the snippet -- the code the check ran on the local
    folder -- loads *model* (at *revision*) instead. *results*: records, or dicts already in that form."""
    entries = []
    for result in results:
        entry = result.entry() if isinstance(result, RunnabilityResult) else check_entry(result)
        if entry["snippet"] and model is not None:
            entry["snippet"] = retarget_snippet(entry["snippet"], model=model, revision=revision)
        entries.append(entry)
    return entries


def publish_to(*, destination: str, source: Path, parts: tuple[str, str, str], manifest: dict, private: bool,
               revision: str, matrix_markdown: str | None = None) -> Publication:
    """Send *source* to *destination* by its scheme: ``file://`` (or a path), ``s3://`` or ``hf://``
    (*matrix_markdown*: a sweep's matrix for the Hub's model card)."""
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
                 decision: GateDecision, runnability: tuple[Any, ...] = (),
                 matrix_markdown: str | None = None) -> Publication:
    return publish_artifact(spec=spec, merge=merge, quant=quant, bench=bench, decision=decision,
                            runnability=runnability, matrix_markdown=matrix_markdown)
