"""Step 7 — record: write the run, its steps, metrics, gate decision and artifacts to the catalog.

One :class:`RunRecorder` per flow run. Every write is its own short transaction, so the catalog
shows a run as ``running`` from its first step, and a failure anywhere still leaves the run
``failed`` with the reason.
"""

from __future__ import annotations

from typing import Any

from modelfactory.benchmark.runnability import RunnabilityReport
from modelfactory.catalog import Catalog, MetricRecord, open_catalog
from modelfactory.catalog.metrics import benchmark_metrics
from modelfactory.core.errors import PublishError, error_kind
from modelfactory.core.log import get_logger
from modelfactory.core.records import (
    AdapterArtifact,
    BenchmarkResult,
    GateDecision,
    MergeResult,
    ModelArtifact,
    Publication,
    QuantResult,
)
from modelfactory.core.versions import host_info, library_versions
from modelfactory.publishing.public import retarget_snippet


class RunRecorder:
    def __init__(self, catalog: Catalog, run_id: str) -> None:
        self.catalog = catalog
        self.run_id = run_id
        #: The content digest of the quantized model this run recorded (what its benchmark loaded).
        self.quantized_sha256: str | None = None

    @classmethod
    def start(cls, *, run_id: str, name: str, spec: dict[str, Any], run_key: str, flow_run_id: str | None,
              catalog_url: str | None = None) -> RunRecorder:
        catalog = open_catalog(catalog_url)
        catalog.start_run(run_id=run_id, name=name, spec=spec, run_key=run_key, flow_run_id=flow_run_id,
                          library_versions=library_versions(), host=host_info())
        return cls(catalog, run_id)

    def sources(self, base: ModelArtifact, adapters: tuple[AdapterArtifact, ...]) -> None:
        self.catalog.set_sources(run_id=self.run_id, base_uri=base.source_uri, base_sha=base.sha,
                                 adapters=[{"uri": a.source_uri, "sha": a.sha, "weight": a.weight} for a in adapters])

    def step(self, name: str, model: ModelArtifact | None = None, *, duration_s: float | None = None,
             reused: bool | None = None, output_uri: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """One step row; *model* supplies duration, reuse and output path unless given."""
        if model is not None:
            reused = model.reused if reused is None else reused
            duration_s = model.duration_s if duration_s is None else duration_s
            output_uri = output_uri or model.path
        self.catalog.record_step(run_id=self.run_id, name=name, status="reused" if reused else "ok",
                                 duration_s=duration_s or 0.0, output_uri=output_uri, detail=detail)

    def merge(self, result: MergeResult) -> None:
        self.step("merge", result.model, detail={"max_abs_logit_diff": result.max_abs_logit_diff,
                                                 "tolerance": result.tolerance, "adapters": len(result.adapters)})
        if result.max_abs_logit_diff is not None:
            self.catalog.record_metrics(run_id=self.run_id, metrics=[MetricRecord(
                name="merge_max_abs_logit_diff", side="", value=result.max_abs_logit_diff, unit="logit")])

    def gpu_stage(self, detail: dict[str, Any], *, duration_s: float, ok: bool) -> None:
        """The GPU stage's flow run (pool dispatch): where it ran, its final state; ``failed`` if not ok."""
        self.catalog.record_step(run_id=self.run_id, name="gpu-stage", status="ok" if ok else "failed",
                                 duration_s=duration_s, output_uri=None, detail=detail)

    def quantize(self, result: QuantResult) -> None:
        self.quantized_sha256 = result.model.sha  # the content digest (tasks/quantize.py)
        self.step("quantize", result.model, detail={"engine": result.engine, "device": result.device,
                                                    "group_size": result.group_size, "sha256": result.model.sha})
        if result.group_size is not None:
            self.catalog.set_resolved_group_size(run_id=self.run_id, group_size=result.group_size)
        self.catalog.record_metrics(run_id=self.run_id, metrics=[MetricRecord(
            name="quantize_s", side="gptq", value=result.quantize_s, unit="s")])

    def runnability(self, report: RunnabilityReport | None, *, artifact: str | None = None) -> None:
        """The plain-transformers check (nothing when disabled) as step ``runnability``: ``failed`` when the
        artifact did not run; per device what happened (:meth:`RunnabilityResult.entry`) as detail, with the
        snippet as it ran. *artifact*: the quantized model's URI, which the snippet then loads instead of
        the folder it ran on -- on a GPU worker that folder is a path of another host."""
        if report is None:
            return
        results = [r.entry() for r in report.results]
        if artifact is not None:
            for entry in results:
                entry["snippet"] = retarget_snippet(entry["snippet"], model=artifact) if entry["snippet"] else None
        self.catalog.record_step(run_id=self.run_id, name="runnability", status="ok" if report.passed else "failed",
                                 duration_s=sum(r.wall_s for r in report.results), output_uri=None,
                                 detail={"passed": report.passed, "summary": report.summary(),
                                         "verified_paths": report.verified_paths(),
                                         "reference": report.reference.model_dump(
                                             mode="json", include={"device", "dtype", "kernel", "ok", "explanation"})
                                         if report.reference else None,
                                         "results": results})

    def benchmark(self, result: BenchmarkResult) -> None:
        self.step("benchmark", duration_s=result.duration_s, reused=result.reused, output_uri=result.path,
                  detail={"path": result.path, "kernel": result.gptq.kernel, "device": result.gptq.device,
                          "gptq_sha256": self.quantized_sha256})  # the files it measured (keyed by them)
        self.catalog.record_metrics(run_id=self.run_id, metrics=benchmark_metrics(result))


    def gate(self, decision: GateDecision, duration_s: float) -> None:
        self.step("gate", duration_s=duration_s, detail={"passed": decision.passed})
        self.catalog.record_gate(run_id=self.run_id, checks=decision.checks)

    def publication(self, publication: Publication, duration_s: float) -> None:
        """The publish step and where it went; refused (:class:`PublishError`) when the published files are
        not the ones this run benchmarked (the publish step checks it too: this is the catalog's guard)."""
        measured, published = self.quantized_sha256, publication.content_sha256
        if measured is not None and published is not None and measured != published:
            raise PublishError(f"run {self.run_id} published {publication.uri} with content {published[:16]}, but "
                               f"benchmarked content {measured[:16]}: not recording it as this run's publication")
        self.step("publish", duration_s=duration_s, reused=publication.reused, output_uri=publication.uri)
        self.catalog.record_artifact(run_id=self.run_id, kind="gptq", uri=publication.uri,
                                     manifest_sha256=publication.manifest_sha256, size_bytes=publication.size_bytes)
        self.catalog.record_publication(run_id=self.run_id, publication=publication)

    def finish(self, status: str) -> None:
        self.catalog.finish_run(run_id=self.run_id, status=status)
        self.summary_artifact()

    def summary_artifact(self) -> None:
        """Leave the run as a Prefect markdown artifact (key ``run-<id8>``; every metric recorded, grouped,
        the runnability checks, the gate: :func:`~modelfactory.reports.run_markdown`); best effort."""
        from prefect.artifacts import create_markdown_artifact

        from modelfactory.reports import run_markdown

        try:
            detail = self.catalog.get_run(self.run_id)
            create_markdown_artifact(key=artifact_key(self.run_id), markdown=run_markdown(detail),
                                     description=f"modelfactory run {self.run_id}: {detail.status}")
        except Exception as exc:  # noqa: BLE001 - the catalog row is the record; the artifact is a view
            get_logger().warning(f"could not create the Prefect artifact of run {self.run_id}: {exc}")

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed; never hides the original error if the catalog write fails too."""
        try:
            self.catalog.finish_run(run_id=self.run_id, status="failed", error=str(exc) or repr(exc),
                                    error_kind=error_kind(exc))
        except Exception as record_exc:  # noqa: BLE001 - report, keep the original error
            get_logger().error(f"could not record failure of run {self.run_id}: {record_exc}")
            return
        self.summary_artifact()


def artifact_key(run_id: str) -> str:
    """The Prefect artifact key of a run's summary: ``run-`` + the first 8 characters of its id."""
    import re

    return "run-" + re.sub(r"[^a-z0-9-]", "-", run_id[:8].lower())
