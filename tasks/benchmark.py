"""Step 4 — benchmark: the GPTQ model against its own fp16 baseline, with one harness.

Two keyed steps, so that every quantized configuration of one merged model shares one fp16
measurement (a sweep measures the fp16 side once):

- :func:`benchmark_baseline` — the fp16 side, in ``<work_dir>/benchmark-fp16/<key>/``, keyed by
  the merged model, the settings that change the fp16 measurement
  (:meth:`~modelfactory.core.specs.BenchmarkSpec.baseline_inputs`: not the GPTQ kernel) and the host;
- :func:`benchmark_candidate` — the GPTQ side against a baseline, in ``<work_dir>/benchmark/<key>/``
  (``benchmark.json``: both sides).

:func:`benchmark_models` is the two in a row (the plain factory flow). Each side is measured in a
process of its own (:func:`modelfactory.benchmark.sides.measure_side`, which says how), one after
the other, so memory numbers are not polluted by the other side. Both sides decode with one
treatment: the GPTQ side is handed the fp16 side's, and when it had to fall back to the plain graph,
the fp16 side is measured again with that fallback (:func:`common_baseline`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from prefect import task

from modelfactory import stage_store
from modelfactory.benchmark.agreement import read_reference_info
from modelfactory.benchmark.graph import GraphTreatment
from modelfactory.benchmark.perplexity import check_same_tokens
from modelfactory.benchmark.sides import AGREEMENT_FILE, REFERENCE_DIR, measure_side
from modelfactory.benchmark.task_eval import check_tasks_available
from modelfactory.core import workdir
from modelfactory.core.devices import gpu_env, resolve_device, resolve_dtype
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.hashing import step_key
from modelfactory.core.isolation import run_isolated
from modelfactory.core.log import progress
from modelfactory.core.records import (
    AgreementMetrics,
    BaselineResult,
    BenchmarkResult,
    ModelArtifact,
    Side,
    SideMetrics,
)
from modelfactory.core.specs import BenchmarkSpec, TaskEvalSpec
from modelfactory.sources.text import load_text

SIDES: tuple[Side, ...] = ("fp16", "gptq")
#: The fp16 side's own step (its folder: ``<work_dir>/benchmark-fp16/<key>/``) and record file.
BASELINE_STEP = "benchmark-fp16"
BASELINE_FILE = "fp16.json"
#: The GPTQ side against a baseline: ``<work_dir>/benchmark/<key>/benchmark.json`` (both sides).
CANDIDATE_STEP = "benchmark"


def _host_fingerprint(spec: BenchmarkSpec) -> dict:
    """What of this host the fp16 measurement depends on, the dtype it computes in included (on a CPU
    that depends on its bf16 instructions: :func:`~modelfactory.core.devices.resolve_dtype`)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    return {"machine": platform.machine(), "gpu": gpu, "torch": torch.__version__, "dtype": dtype}


def _side_record(data: object, *, side: Side) -> SideMetrics:
    metrics = SideMetrics.model_validate(data)
    if metrics.side != side:
        raise ValueError(f"the {side} record is of side {metrics.side!r}")
    return metrics


def _stored_baseline(folder: Path, *, spec: BenchmarkSpec) -> SideMetrics:
    """The fp16 side of a finished baseline step, validated (with its agreement reference when *spec*
    measures agreement); :class:`BenchmarkError` if unreadable."""
    try:
        metrics = _side_record(json.loads((folder / BASELINE_FILE).read_text()), side="fp16")
    except (OSError, ValueError, TypeError) as exc:  # JSON and pydantic errors are ValueErrors
        raise BenchmarkError(f"stored fp16 baseline {folder} is unreadable ({exc})") from exc
    if spec.agreement.enabled:  # finished and readable; the GPTQ side checks it scores the very same tokens
        read_reference_info(folder / REFERENCE_DIR)
    return metrics


def _agreement_record(folder: Path, *, spec: BenchmarkSpec) -> AgreementMetrics | None:
    """The GPTQ side's agreement statistics in *folder* (``None`` when *spec* does not measure them)."""
    if not spec.agreement.enabled:
        return None
    return AgreementMetrics.model_validate_json((folder / AGREEMENT_FILE).read_text())


def _stored_candidate(folder: Path, *, baseline: BaselineResult, spec: BenchmarkSpec,
                      ) -> tuple[BaselineResult, SideMetrics, AgreementMetrics | None]:
    """The GPTQ side of a finished benchmark against *baseline* (or against the fp16 side measured again with
    the GPTQ side's decode treatment, :func:`common_baseline`), validated as a fresh one is before it is
    committed: ``(baseline it was combined with, gptq, agreement)``.

    Raises :class:`BenchmarkError` when ``benchmark.json`` is unreadable, its records are invalid, its fp16
    side is not that baseline's measurement (the baseline was measured again since), or its sides scored
    different tokens.
    """
    try:
        data = json.loads((folder / "benchmark.json").read_text())
        sides = {side: _side_record(data[side], side=side) for side in SIDES}
        agreement = _agreement_record(folder, spec=spec)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSON and pydantic errors are ValueErrors
        raise BenchmarkError(f"stored benchmark {folder} is unreadable ({exc})") from exc
    common = common_baseline(baseline, gptq=sides["gptq"], spec=spec)
    if sides["fp16"] != common.metrics:
        raise BenchmarkError(f"stored benchmark {folder} was combined with another fp16 measurement than "
                             f"the baseline in {common.path}")
    check_same_tokens(**sides)
    return common, sides["gptq"], agreement


def _measure(model: ModelArtifact, *, side: Side, spec: BenchmarkSpec, log_path: Path, out_dir: Path,
             treatment: GraphTreatment | None = None, allow_fallback: bool = True,
             baseline: BaselineResult | None = None) -> SideMetrics:
    """One side in a process of its own (:func:`~modelfactory.benchmark.sides.measure_side`); the models are
    fetched to this host first when they were built on another one (:func:`modelfactory.stage_store.resolve`).
    *baseline*: the GPTQ side's fp16 measurement (its top-k reference, and its model for the exact KL)."""
    progress(f"benchmark: measuring {side} side ({model.path})"
             + (f" with the decode treatment {treatment}" if treatment else ""))
    text, origin = load_text(spec.perplexity.text)
    reference_dir = baseline_model_path = None
    if baseline is not None:
        reference_dir = str(stage_store.resolve(baseline.path))
        if baseline.model is not None:
            baseline_model_path = str(stage_store.resolve(baseline.model.path))
    return _side_record(run_isolated(
        measure_side,
        kwargs={"model_path": str(stage_store.resolve(model.path)), "side": side,
                "spec": spec.model_dump(mode="json"), "text": text, "text_origin": origin, "treatment": treatment,
                "allow_fallback": allow_fallback, "out_dir": str(out_dir), "reference_dir": reference_dir,
                "baseline_model_path": baseline_model_path},
        log_path=log_path, env=gpu_env(), unexpected=BenchmarkError,
    ), side=side)


def baseline_key(*, model_sha: str, spec: BenchmarkSpec, treatment: GraphTreatment | None = None) -> str:
    """The fp16 side's step key: the merged model, the settings its measurement depends on
    (:meth:`~modelfactory.core.specs.BenchmarkSpec.baseline_inputs`), this host, and a decode *treatment*
    forced on it (:func:`common_baseline`; none: the spec's, with its fallback)."""
    forced = {"treatment": treatment} if treatment else {}
    return step_key(BASELINE_STEP, model=model_sha, spec=spec.baseline_inputs(), host=_host_fingerprint(spec),
                    **forced)


def _reusable(step: str, key: str, spec: BenchmarkSpec) -> stage_store.StepOutput | None:
    """The finished output of *step* for *key* to try reusing (this host's work dir, else the stage
    store); with ``spec.reuse`` off, none, and a finished local one is discarded so the fresh
    measurement replaces it."""
    done = stage_store.find(step, key)
    if done is not None and not spec.reuse:
        stage_store.discard(step, key)  # on every host: the fresh measurement replaces the stored one
        return None
    return done


def benchmark_baseline(*, model: ModelArtifact, spec: BenchmarkSpec,
                       treatment: GraphTreatment | None = None) -> BaselineResult:
    """Measure the fp16 side of *model* once for every quantized configuration of it.

    Stored in ``benchmark-fp16/<key>/`` (:func:`baseline_key`) with the side's per-window outputs
    (:func:`~modelfactory.benchmark.sides.window_outputs`), and in the stage store when one is set, so
    configurations measured on other hosts reuse it. A finished baseline is reused if its record is valid;
    one that is not is discarded and measured again. *treatment*: decode with exactly this CUDA-graph
    treatment, without a fallback (:func:`common_baseline`).
    """
    start = time.perf_counter()
    key = baseline_key(model_sha=model.sha, spec=spec, treatment=treatment)
    if (done := _reusable(BASELINE_STEP, key, spec)) is not None:
        try:
            metrics = _stored_baseline(done.folder(), spec=spec)
        except BenchmarkError as exc:
            progress(f"benchmark: not reusing {done.uri}: {exc}; measuring again")
            stage_store.discard(BASELINE_STEP, key)
        else:
            progress(f"benchmark: reusing the fp16 side {done.uri}")
            return BaselineResult(model_sha=model.sha, model=model, metrics=metrics, key=key, path=done.uri,
                                  reused=True, duration_s=time.perf_counter() - start)
    final = workdir.step_dir(BASELINE_STEP, key)
    with workdir.building(BASELINE_STEP, key) as (tmp, marker):
        metrics = _measure(model, side="fp16", spec=spec, log_path=final.with_suffix(".log"), out_dir=tmp,
                           treatment=treatment, allow_fallback=treatment is None)
        (tmp / BASELINE_FILE).write_text(metrics.model_dump_json(indent=2))
        marker.update(model=model.sha)
    done = stage_store.publish(BASELINE_STEP, key)
    # What is stored is the baseline (a concurrent identical measurement may have been committed first).
    return BaselineResult(model_sha=model.sha, model=model, metrics=_stored_baseline(done.folder(), spec=spec), key=key,
                          path=done.uri, duration_s=time.perf_counter() - start)


def graph_treatment(decode_mode: str) -> GraphTreatment | None:
    """The CUDA-graph treatment a recorded decode mode names (``cuda_graph:<treatment>``), else ``None``."""
    prefix = "cuda_graph:"
    return decode_mode.removeprefix(prefix) if decode_mode.startswith(prefix) else None  # type: ignore[return-value]


def common_baseline(baseline: BaselineResult, *, gptq: SideMetrics, spec: BenchmarkSpec) -> BaselineResult:
    """*baseline*, or, when the GPTQ side decoded with another treatment (its check failed the fp16 side's
    and it fell back to the plain graph), the fp16 side measured again (or reused) with that same treatment,
    so that the speed-up compares like with like. A baseline record without its model cannot be measured
    again: it is kept, and the speed-up is then not measured (:meth:`BenchmarkResult.decode_speedup`)."""
    if gptq.decode_mode == baseline.metrics.decode_mode:
        return baseline
    treatment = graph_treatment(gptq.decode_mode)
    if baseline.model is None or treatment is None:
        progress(f"benchmark: the sides decoded differently (fp16 {baseline.metrics.decode_mode}, gptq "
                 f"{gptq.decode_mode}) and the fp16 side cannot be measured again: speed-ups not measured")
        return baseline
    progress(f"benchmark: the GPTQ side decoded with {gptq.decode_mode} (the fp16 side's "
             f"{baseline.metrics.decode_mode} failed its check there): the fp16 side with {treatment} too")
    return benchmark_baseline(model=baseline.model, spec=spec, treatment=treatment)


def benchmark_candidate(*, baseline: BaselineResult, candidate: ModelArtifact, spec: BenchmarkSpec,
                        ) -> BenchmarkResult:
    """Measure the GPTQ side of *candidate* and combine it with *baseline*, its merged model's fp16 side.

    *baseline* must come from :func:`benchmark_baseline` with the same fp16 settings on this kind of
    host (its key is checked). The GPTQ side decodes with the baseline's treatment (:func:`common_baseline`
    when it cannot). Both sides must have scored the same tokens before the result is committed, and a
    finished benchmark is reused only if it passes the same checks; one that fails them is discarded and
    the GPTQ side measured again.
    """
    start = time.perf_counter()
    expected = baseline_key(model_sha=baseline.model_sha, spec=spec)
    if baseline.key != expected:
        raise BenchmarkError(
            f"the fp16 baseline in {baseline.path} (key {baseline.key}) was measured with other benchmark settings "
            f"or on another kind of host than this benchmark's (key {expected}): measure the baseline with this "
            f"spec on this kind of host (benchmark_baseline) and pass that")
    key = step_key(CANDIDATE_STEP, baseline=baseline.key, gptq=candidate.sha, spec=spec.candidate_inputs())
    if (done := _reusable(CANDIDATE_STEP, key, spec)) is not None:
        try:
            common, gptq, agreement = _stored_candidate(done.folder(), baseline=baseline, spec=spec)
        except BenchmarkError as exc:
            progress(f"benchmark: not reusing {done.uri}: {exc}; measuring again")
            stage_store.discard(CANDIDATE_STEP, key)
        else:
            progress(f"benchmark: reusing {done.uri}")
            return _result(common, gptq=gptq, agreement=agreement, path=done.uri, reused=True, start=start)
    final = workdir.step_dir(CANDIDATE_STEP, key)
    with workdir.building(CANDIDATE_STEP, key) as (tmp, marker):
        gptq = _measure(candidate, side="gptq", spec=spec, log_path=final.with_suffix(".log"), out_dir=tmp,
                        treatment=graph_treatment(baseline.metrics.decode_mode), baseline=baseline)
        common = common_baseline(baseline, gptq=gptq, spec=spec)
        check_same_tokens(fp16=common.metrics, gptq=gptq)  # before the commit: never stored for reuse
        _agreement_record(tmp, spec=spec)  # the worker wrote it (checked before the commit)
        sides = {"fp16": common.metrics, "gptq": gptq}
        (tmp / "benchmark.json").write_text(json.dumps({k: v.model_dump(mode="json") for k, v in sides.items()},
                                                       indent=2))
        marker.update(fp16=baseline.model_sha, gptq=candidate.sha, baseline=common.key)
    done = stage_store.publish(CANDIDATE_STEP, key)
    # What is stored is the result (a concurrent identical measurement may have been committed first).
    common, gptq, agreement = _stored_candidate(done.folder(), baseline=baseline, spec=spec)
    return _result(common, gptq=gptq, agreement=agreement, path=done.uri, reused=False, start=start)


def _result(baseline: BaselineResult, *, gptq: SideMetrics, agreement: AgreementMetrics | None, path: str,
            reused: bool, start: float) -> BenchmarkResult:
    return BenchmarkResult(fp16=baseline.metrics, gptq=gptq, agreement=agreement, path=path, reused=reused,
                           baseline_path=baseline.path, baseline_reused=baseline.reused,
                           duration_s=time.perf_counter() - start)


def benchmark_models(*, baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    """Measure *baseline* (fp16) and *candidate* (GPTQ) with the same harness and settings:
    :func:`benchmark_baseline` (reused when another configuration of the model measured it), then
    :func:`benchmark_candidate`."""
    start = time.perf_counter()
    fp16 = benchmark_baseline(model=baseline, spec=spec)
    result = benchmark_candidate(baseline=fp16, candidate=candidate, spec=spec)
    return result.model_copy(update={"duration_s": time.perf_counter() - start})


@task(name="benchmark")
def benchmark_task(baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    return benchmark_models(baseline=baseline, candidate=candidate, spec=spec)


@task(name="benchmark-fp16")
def benchmark_baseline_task(model: ModelArtifact, spec: BenchmarkSpec) -> BaselineResult:
    return benchmark_baseline(model=model, spec=spec)


@task(name="benchmark-gptq")
def benchmark_candidate_task(baseline: BaselineResult, candidate: ModelArtifact, spec: BenchmarkSpec,
                             ) -> BenchmarkResult:
    return benchmark_candidate(baseline=baseline, candidate=candidate, spec=spec)


#: ``log_prints=False``: loading a task's data makes ``datasets`` pickle functions with dill, whose
#: global-variable scan disassembles them with ``dis.dis`` into a redirected ``sys.stdout``. The flows'
#: ``log_prints`` would take those prints for the step's own and log a page of bytecode per run.
@task(name="check-tasks", log_prints=False)
def check_tasks_task(spec: TaskEvalSpec) -> None:
    """Before any heavy work: every lm-eval task of *spec* is known and its data is on this machine
    (:func:`~modelfactory.benchmark.task_eval.check_tasks_available`); nothing to check without tasks."""
    if spec.names:
        check_tasks_available(spec.names)
