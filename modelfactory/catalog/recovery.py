"""Re-record a published artifact in the catalog from its manifest (``modelfactory catalog import``).

The manifest of every published artifact holds what its run measured and decided (spec, source
SHAs, both sides' metrics, the gate) — so when the catalog was unreachable at the end of a run
(the model was published, the catalog never heard), nothing is lost:

1. an artifact whose manifest digest a finished run already recorded as published is left alone;
2. else the run that recorded part of it (its artifact row but not the rest), or the newest
   unfinished run with the same run key (``running``/``failed``, no artifact) — the run that
   published it and then lost its database — is completed (rows it has are not added twice);
3. else a new run is recorded (e.g. into a fresh catalog).

And the runs and sweeps whose process died (``modelfactory catalog reconcile``, and once when
``modelfactory serve`` starts): :func:`reconcile` closes as ``failed`` (``error_kind`` ``crashed``)
every run or sweep still ``running`` whose flow run Prefect reports ended (Crashed, Failed,
Cancelled, Completed), or whose liveness lease in the catalog expired (the process stopped renewing
it: SIGKILL, out of memory, the host lost; a flow run in the process itself has no worker to send
heartbeats, so Prefect may show it ``RUNNING`` for ever). A run that is alive keeps renewing its
lease (:func:`~modelfactory.catalog.claims.keep_alive`) and is never touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from sqlalchemy import select

from modelfactory.catalog import Catalog, MetricRecord, claims
from modelfactory.catalog.metrics import benchmark_metrics
from modelfactory.catalog.models import Artifact, Run
from modelfactory.catalog.models import Publication as PublicationRow
from modelfactory.core.errors import CrashedError, PublishError
from modelfactory.core.hashing import step_key
from modelfactory.core.manifest import content_digest
from modelfactory.core.records import (
    BenchmarkResult,
    GateCheck,
    Publication,
    SideMetrics,
)
from modelfactory.core.specs import parse_spec
from modelfactory.publishing.artifacts import verify_artifact


@dataclass(frozen=True)
class ImportResult:
    run_id: str
    action: Literal["already-recorded", "completed", "created"]
    manifest_sha256: str


def import_artifact(catalog: Catalog, *, uri: str) -> ImportResult:
    """Record the artifact at *uri* in *catalog* (idempotent, see the module docstring)."""
    manifest = verify_artifact(uri=uri)  # every file's hash checked
    digest = manifest["manifest_sha256"]
    for key in ("spec", "sources", "metrics", "gate"):
        if key not in manifest:
            raise PublishError(f"manifest of {uri} has no {key!r}: it was not written by a factory run, "
                               f"so there is nothing to record")
    spec = manifest["spec"]
    # The run's own key: the published spec names local sources by name only, so it no longer hashes
    # to the key the run was recorded under (manifests before that carry no run_key and full paths).
    run_key = manifest.get("run_key") or step_key("run", spec=parse_spec(spec, origin=f"manifest of {uri}"))
    known = _run_with_manifest(catalog, digest)
    if known and _complete(catalog, known, digest):
        return ImportResult(known, "already-recorded", digest)
    run_id = known or _unfinished_run(catalog, run_key)
    if run_id is not None:
        _check_measured(catalog.get_run(run_id), manifest, uri=uri)
    action = "completed" if run_id else "created"
    if run_id is None:
        run_id = str(uuid.uuid4())
        catalog.start_run(run_id=run_id, name=str(spec.get("name") or "run"), spec=spec, run_key=run_key,
                          library_versions={"imported_from": uri, "engine": manifest.get("engine")})
    sources = manifest["sources"]
    if catalog.get_run(run_id).base_sha is None:  # a run that recorded its sources keeps their full paths
        catalog.set_sources(run_id=run_id, base_uri=sources["base"]["uri"], base_sha=sources["base"]["sha"],
                            adapters=[{"uri": a["source_uri"], "sha": a["sha"], "weight": a.get("weight", 1.0)}
                                      for a in sources.get("adapters", [])])
    catalog.record_metrics(run_id=run_id, metrics=_manifest_metric_rows(manifest["metrics"], uri=uri))
    catalog.record_gate(run_id=run_id, checks=[GateCheck.model_validate(c) for c in manifest["gate"]["checks"]])
    size = int(manifest["total_bytes"])
    detail = catalog.get_run(run_id)
    if not any(a.manifest_sha256 == digest for a in detail.artifacts):
        catalog.record_artifact(run_id=run_id, kind="gptq", uri=uri, manifest_sha256=digest, size_bytes=size)
    if not any(p.manifest_sha256 == digest for p in detail.publications):
        destination = "s3" if urlparse(uri).scheme == "s3" else "file"
        catalog.record_publication(run_id=run_id, publication=Publication(
            destination=destination, uri=uri, manifest_sha256=digest, size_bytes=size,
            content_sha256=content_digest(manifest["files"])))
    catalog.finish_run(run_id=run_id, status="passed" if manifest["gate"]["passed"] else "rejected")
    return ImportResult(run_id, action, digest)


def _check_measured(detail, manifest: dict, *, uri: str) -> None:
    """Read-back check: the artifact's files are the ones the run benchmarked (the benchmark step's
    ``gptq_sha256``), else :class:`PublishError` and nothing is recorded."""
    bench = next((s for s in detail.steps if s.name == "benchmark"), None)
    measured = (bench.detail or {}).get("gptq_sha256") if bench is not None else None
    if measured is not None and content_digest(manifest["files"]) != measured:
        raise PublishError(f"{uri}: its files (content {content_digest(manifest['files'])[:16]}) are not the ones run "
                           f"{detail.id} benchmarked (content {measured[:16]}): not recording it as that run's "
                           "artifact; run the factory again")


def _manifest_metric_rows(metrics: dict, *, uri: str) -> list[MetricRecord]:
    """The metric rows a manifest carries (``measured``: exactly what the run recorded), or for an
    older manifest those of its two sides' records."""
    if metrics.get("measured"):
        return [MetricRecord(name=m["name"], side=m["side"], value=float(m["value"]), unit=m.get("unit", ""))
                for m in metrics["measured"]]
    bench = BenchmarkResult(fp16=SideMetrics.model_validate(metrics["fp16"]),
                            gptq=SideMetrics.model_validate(metrics["gptq"]), path=uri)
    return benchmark_metrics(bench)


def _run_with_manifest(catalog: Catalog, digest: str) -> str | None:
    with catalog.reading(f"find the run of manifest {digest}") as session:
        found = session.scalar(select(Artifact.run_id).where(Artifact.manifest_sha256 == digest).limit(1))
        return found or session.scalar(
            select(PublicationRow.run_id).where(PublicationRow.manifest_sha256 == digest).limit(1))


def _complete(catalog: Catalog, run_id: str, digest: str) -> bool:
    """Whether *run_id* is finished and recorded the publication of manifest *digest*."""
    detail = catalog.get_run(run_id)
    published = any(p.manifest_sha256 == digest for p in detail.publications)
    return detail.status in ("passed", "rejected") and published


def _unfinished_run(catalog: Catalog, run_key: str) -> str | None:
    """The newest run with *run_key* that never recorded an artifact and did not pass or get rejected."""
    has_artifact = select(Artifact.id).where(Artifact.run_id == Run.id).exists()
    stmt = (select(Run.id).where(Run.run_key == run_key, Run.status.in_(("running", "failed")), ~has_artifact)
            .order_by(Run.started_at.desc()).limit(1))
    with catalog.reading(f"find an unfinished run with key {run_key}") as session:
        return session.scalar(stmt)


def local_artifact_uris(root: Path) -> list[str]:
    """Every complete artifact (folder with a manifest) under a ``file://`` store folder."""
    return sorted(p.parent.resolve().as_uri() for p in root.rglob("manifest.json"))


#: Prefect state types of a flow run that is over.
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


@dataclass(frozen=True)
class Reconciled:
    """A run or sweep :func:`reconcile` closed, and why."""

    kind: Literal["run", "sweep"]
    id: str
    flow_run_id: str | None
    reason: str


def reconcile(catalog: Catalog, *, flow_run_state: Callable[[str], str | None] | None = None) -> list[Reconciled]:
    """Close every run and sweep the catalog shows ``running`` whose process is gone (module docstring).

    *flow_run_state*: the Prefect state type of a flow run id, ``None`` when the server has no such
    run; not given (no Prefect server to ask), the liveness leases alone decide.
    """
    running = [("run", *row) for row in catalog.running_runs()] + [("sweep", *row) for row in catalog.running_sweeps()]
    alive = claims.live(catalog, [claims.alive_key(kind, ident) for kind, ident, _ in running])
    closed = []
    for kind, ident, flow_run_id in running:
        state = flow_run_state(flow_run_id) if flow_run_state is not None and flow_run_id else None
        lease_alive = claims.alive_key(kind, ident) in alive
        if state in ENDED_STATES:
            reason = (f"its flow run {flow_run_id} ended {state} while the catalog still showed it running: the "
                      "process died before it could record its end")
        elif not lease_alive:
            where = ("" if flow_run_state is None or not flow_run_id
                     else f" (its flow run {flow_run_id} is not on the Prefect server)" if state is None
                     else f" (its flow run {flow_run_id} still shows {state}: nothing marked it crashed)")
            reason = (f"it stopped renewing its liveness lease in the catalog{where}: the process died (killed, "
                      "out of memory, or its host was lost)")
        else:
            continue
        message = f"{kind} {ident} crashed: {reason}. Run it again: finished steps are reused"
        if kind == "run":
            catalog.finish_run(run_id=ident, status="failed", error=message, error_kind=CrashedError.kind)
        else:
            catalog.fail_sweep(sweep_id=ident, error=message, error_kind=CrashedError.kind)
        closed.append(Reconciled(kind=kind, id=ident, flow_run_id=flow_run_id, reason=reason))
    return closed
