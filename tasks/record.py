"""Step 7 — record: write the run, its steps, metrics, gate decision and artifacts to the catalog.

One :class:`RunRecorder` per flow run. Every write is its own short transaction, so the catalog
shows a run as ``running`` from its first step, and a failure anywhere still leaves the run
``failed`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelfactory.benchmark.runnability import RunnabilityReport
from modelfactory.catalog import Catalog, MetricRecord, claims, open_catalog
from modelfactory.catalog.metrics import benchmark_metrics
from modelfactory.core.errors import (
    CatalogNotFoundError,
    CatalogQueryError,
    CrashedError,
    PublishError,
    error_kind,
)
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
from modelfactory.core.specs import GateSpec
from modelfactory.core.versions import host_info, library_versions
from modelfactory.gpu_pool import GpuStageRun
from modelfactory.publishing.public import retarget_snippet
from modelfactory.tasks.gate import decide_before_benchmark


class RunRecorder:
    def __init__(self, catalog: Catalog, run_id: str) -> None:
        self.catalog = catalog
        self.run_id = run_id
        #: The content digest of the quantized model this run recorded (what its benchmark loaded).
        self.quantized_sha256: str | None = None
        #: The run-key claim this run holds (:meth:`hold`): every step record and the publication check it.
        self.claim: claims.Claim | None = None
        #: Ends this run's liveness lease (:meth:`start`; ``modelfactory catalog reconcile`` reads it).
        self._alive: Callable[[], None] | None = None

    def hold(self, claim: claims.Claim) -> None:
        """Fence this run's records by *claim*: once it is lost (another run took the key), the next step
        record, publication or finish raises :class:`~modelfactory.core.errors.ClaimError`."""
        self.claim = claim

    def check_claim(self) -> None:
        """The fence (:meth:`hold`): raise when the claim was lost; call it before publishing too."""
        if self.claim is not None:
            self.claim.check()

    @classmethod
    def start(cls, *, run_id: str, name: str, spec: dict[str, Any], run_key: str, flow_run_id: str | None,
              catalog_url: str | None = None) -> RunRecorder:
        """Record the run as ``running`` and hold its liveness lease until it ends.

        A run id already in the catalog is started again when its earlier attempt is over: it failed, or
        it is still ``running`` but its process died (its liveness lease expired). That is a retry of the
        same flow run (the on-finetune flow's run id is its flow run id, so a Prefect retry has the same
        id). A finished run, or one whose process is alive, is not started again."""
        catalog = open_catalog(catalog_url)
        try:
            catalog.start_run(run_id=run_id, name=name, spec=spec, run_key=run_key, flow_run_id=flow_run_id,
                              library_versions=library_versions(), host=host_info())
        except CatalogQueryError:
            earlier = catalog.get_run(run_id)
            alive = claims.alive_key("run", run_id) in claims.live(catalog, [claims.alive_key("run", run_id)])
            if earlier.status != "failed" and (earlier.status != "running" or alive):
                raise
            get_logger().info(f"run {run_id}: its earlier attempt {'failed' if earlier.status == 'failed' else 'died'}"
                              "; starting it again")
            catalog.restart_run(run_id=run_id, flow_run_id=flow_run_id, library_versions=library_versions(),
                                host=host_info())
        recorder = cls(catalog, run_id)
        recorder._alive = claims.keep_alive(catalog, claims.alive_key("run", run_id), holder=claims.holder_name(run_id))
        return recorder

    def sources(self, base: ModelArtifact, adapters: tuple[AdapterArtifact, ...]) -> None:
        self.catalog.set_sources(run_id=self.run_id, base_uri=base.source_uri, base_sha=base.sha,
                                 adapters=[{"uri": a.source_uri, "sha": a.sha, "weight": a.weight} for a in adapters])

    def step(self, name: str, model: ModelArtifact | None = None, *, duration_s: float | None = None,
             reused: bool | None = None, output_uri: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """One step row; *model* supplies duration, reuse and output path unless given."""
        self.check_claim()
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

    def gpu_stage(self, stage: GpuStageRun, *, gate: GateSpec | None = None,
                  ) -> tuple[QuantResult, BenchmarkResult | None, RunnabilityReport | None]:
        """Record the GPU stage's flow run (pool dispatch: where it ran, its final state) and what it built,
        and hand its records back; raise the stage's error when it failed.

        *gate*: the gate in effect; the stage stops before the benchmark when a runnability check it
        requires fails (then no benchmark comes back, and that is not a failure)."""
        outcome = stage.outcome
        stopped = (gate is not None and outcome is not None and outcome.benchmark is None
                   and decide_before_benchmark(spec=gate, runnability=outcome.runnability) is not None)
        ok = stage.state_type == "COMPLETED" and outcome is not None and (outcome.benchmark is not None or stopped)
        self.catalog.record_step(run_id=self.run_id, name="gpu-stage", status="ok" if ok else "failed",
                                 duration_s=stage.run_s or 0.0, output_uri=None, detail=stage.detail())
        if outcome is not None and outcome.quantize is not None:
            self.quantize(outcome.quantize)  # recorded even when the benchmark then failed
            self.runnability(outcome.runnability, artifact=outcome.quantize.model.path)
        if not ok:
            raise stage.error()
        assert outcome is not None and outcome.quantize is not None
        if outcome.benchmark is not None:
            self.benchmark(outcome.benchmark)
        return outcome.quantize, outcome.benchmark, outcome.runnability

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
                          "gptq_sha256": self.quantized_sha256,  # the files it measured (keyed by them)
                          # how the KL was computed (exact, or a top-k lower bound that is never gated), and why
                          "kld_method": result.agreement.kld_method if result.agreement else None,
                          "kld_method_note": result.agreement.kld_method_note if result.agreement else None,
                          "decode_mode": result.gptq.decode_mode})
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
        self.check_claim()
        self.catalog.finish_run(run_id=self.run_id, status=status)
        self._end()
        self.summary_artifact()

    def _end(self) -> None:
        if self._alive is not None:
            self._alive()
            self._alive = None

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
            return  # the lease stays: it expires with this process, and reconcile then closes the run
        self._end()
        self.summary_artifact()


def artifact_key(run_id: str) -> str:
    """The Prefect artifact key of a run's summary: ``run-`` + the first 8 characters of its id."""
    import re

    return "run-" + re.sub(r"[^a-z0-9-]", "-", run_id[:8].lower())


def prepare_sweep_retry(*, sweep_id: str, catalog_url: str | None = None) -> None:
    """Let the ``sweep`` flow start *sweep_id* again when its earlier attempt is over: :meth:`RunRecorder.start`'s
    rule for sweeps. The on-finetune flow's sweep id is its flow run id, so a Prefect retry of that flow run
    comes with the same id, which the sweep flow's ``start_sweep`` would refuse. An id not in the catalog:
    nothing to do. An attempt that failed, or is still ``running`` but whose process died (its liveness lease
    expired): its record is discarded (its member runs stay in the catalog) and the sweep flow records the
    sweep afresh under the same id. A finished sweep, or one whose process is alive, is left alone (the sweep
    flow then refuses the id)."""
    catalog = open_catalog(catalog_url)
    try:
        earlier = catalog.get_sweep(sweep_id)
    except CatalogNotFoundError:
        return
    if earlier.id != sweep_id:  # a prefix of another sweep's id: this id is new
        return
    alive = claims.alive_key("sweep", sweep_id) in claims.live(catalog, [claims.alive_key("sweep", sweep_id)])
    if earlier.status != "failed" and (earlier.status != "running" or alive):
        return
    unlinked = catalog.discard_sweep(sweep_id=sweep_id)
    get_logger().info(f"sweep {sweep_id}: its earlier attempt {'failed' if earlier.status == 'failed' else 'died'}; "
                      f"starting it again ({unlinked} member run(s) of that attempt stay in the catalog)")


def record_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_crashed`` hook of the factory and sweep flows: the runs and sweeps of this flow run that
    are still ``running`` become ``failed`` (``crashed``) with the crash's message. Where no hook can run
    (SIGKILL, a lost host), ``modelfactory catalog reconcile`` finds them (:mod:`modelfactory.catalog.recovery`)."""
    message = (f"flow run {flow_run.id} crashed ({state.name}: {state.message or 'no message'}): the process was "
               "stopped before the run ended. Run it again: finished steps are reused")
    try:
        catalog = open_catalog()
        for run_id, flow_run_id in catalog.running_runs():
            if flow_run_id == str(flow_run.id):
                catalog.finish_run(run_id=run_id, status="failed", error=message, error_kind=CrashedError.kind)
        for sweep_id, flow_run_id in catalog.running_sweeps():
            if flow_run_id == str(flow_run.id):
                catalog.fail_sweep(sweep_id=sweep_id, error=message, error_kind=CrashedError.kind)
    except Exception as exc:  # noqa: BLE001 - a hook must not hide the crash; reconcile closes them later
        get_logger().error(f"could not record the crash of flow run {flow_run.id}: {exc}")
