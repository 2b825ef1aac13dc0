"""Step 3b — runnability: does the quantized artifact run where users run it, and compute what is measured?

Right after quantize, before the benchmark spends anything: the factory's own reference (the artifact
loaded as the benchmark loads it, in an isolated step process), then plain
``transformers.AutoModelForCausalLM.from_pretrained`` with default settings in a ``python -I`` process that
imports no factory code, on CPU always and on CUDA when this host has a GPU, each compared with the
reference teacher-forced (:mod:`modelfactory.benchmark.runnability`, which says how a failure is told apart:
the host's, the default kernel's or the artifact's). The report never raises for an artifact that fails:
the gate decides (``gate.require_runnable``, ``gate.require_default_path``), and the flow stops there.

A check that could verify nothing for reasons of this host only (no network for a kernel's sources, no
toolchain, out of memory, a timeout) raises :class:`~modelfactory.core.errors.HostCheckError`: the run fails
as not verified here (retry it elsewhere), it is not rejected as broken.

Keyed by the quantized artifact, the versions of the libraries that load it, the check's settings, the
benchmark's loading path (device, dtype, kernel: the reference) and the devices it covers; the report
(``report.json``) is stored and reused like every step output. A report whose check died or timed out
(the machine, not the artifact) is not reused.
"""

from __future__ import annotations

import json
from importlib import metadata

from prefect import task

from modelfactory import stage_store
from modelfactory.benchmark import plain_load
from modelfactory.benchmark.runnability import (
    RunnabilityReference,
    RunnabilityReport,
    check_runs_plainly,
    measure_reference,
    resolve_devices,
)
from modelfactory.core import workdir
from modelfactory.core.devices import gpu_env
from modelfactory.core.errors import BenchmarkError, HostCheckError
from modelfactory.core.hashing import step_key
from modelfactory.core.isolation import run_isolated
from modelfactory.core.log import progress
from modelfactory.core.records import QuantResult
from modelfactory.core.specs import BenchmarkSpec

STEP = "runnability"
REPORT_FILE = "report.json"
#: The libraries a user's plain load goes through: a new version of any of them is a new check.
LOADING_LIBRARIES = ("torch", "transformers", "gptqmodel", "optimum", "accelerate", "safetensors")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LOADING_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def runnability_key(*, quant: QuantResult, spec: BenchmarkSpec) -> str:
    devices = resolve_devices(spec.runnability.devices)
    return step_key(STEP, model=quant.model.sha, versions=_versions(), devices=list(devices),
                    gpu=_gpu_name() if "cuda" in devices or spec.device != "cpu" else None,
                    reference=spec.model_dump(mode="json", include={"device", "dtype", "kernel"}),
                    spec=spec.runnability.model_dump(mode="json", exclude={"enabled", "devices", "timeout_s"}))


def _stored(folder) -> RunnabilityReport:
    try:
        report = RunnabilityReport.model_validate_json((folder / REPORT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"stored runnability report in {folder} is unreadable ({exc})") from exc
    if any(r.failure_kind == "environment" for r in report.results) or (
            report.reference is not None and report.reference.failure_kind == "environment"):
        raise BenchmarkError(f"the stored runnability check in {folder} could not run everything on its host "
                             "(not the artifact's doing)")
    return report


def check_runnable(*, quant: QuantResult, spec: BenchmarkSpec) -> RunnabilityReport:
    """The plain-transformers report of *quant*'s artifact against the factory's own reference (reused when
    this artifact was checked with the same libraries, settings and devices)."""
    key = runnability_key(quant=quant, spec=spec)
    if (done := stage_store.find(STEP, key)) is not None:
        try:
            report = _stored(done.folder())
        except BenchmarkError as exc:
            progress(f"runnability: not reusing {done.uri}: {exc}; checking again")
            workdir.discard(STEP, key)
        else:
            progress(f"runnability: reusing {done.uri}: {report.summary()}")
            return report
    check = spec.runnability
    model_dir = stage_store.resolve(quant.model.path)
    final = workdir.step_dir(STEP, key)
    progress(f"runnability: the factory's own reference ({check.check_tokens} greedy tokens, the benchmark's kernel)")
    reference = RunnabilityReference.model_validate(run_isolated(
        measure_reference, kwargs={"model_path": str(model_dir), "spec": spec.model_dump(mode="json"),
                                   "prompt": plain_load.DEFAULT_PROMPT, "check_tokens": check.check_tokens,
                                   "near_tie_nats": check.near_tie_nats},
        log_path=final.with_suffix(".log"), env=gpu_env(), unexpected=BenchmarkError))
    if not reference.ok:
        progress(f"runnability: FAILED at the reference ({reference.failure_kind}): {reference.explanation}")
        report = RunnabilityReport(model_dir=str(model_dir), reference=reference, results=(),
                                   min_top1_agreement_pct=check.min_top1_agreement_pct)
    else:
        progress(f"runnability: reference on {reference.device} ({reference.kernel}): {reference.text!r}")
        report = check_runs_plainly(model_dir=model_dir, devices=check.devices, timeout_s=check.timeout_s,
                                    new_tokens=check.new_tokens, reference=reference,
                                    min_top1_agreement_pct=check.min_top1_agreement_pct,
                                    log_path=final.with_suffix(".log"))
    if report.environment_only:
        raise HostCheckError(f"runnability of {quant.model.path}: not verified on this host, for reasons of the "
                             f"host, not the artifact: {report.summary()}. Run it where the check can run (network "
                             f"for kernel sources, a toolchain, enough memory) or prepare this host "
                             f"(`modelfactory kernels prepare`)")
    with workdir.building(STEP, key) as (tmp, marker):
        (tmp / REPORT_FILE).write_text(report.model_dump_json(indent=2))
        marker.update(model=quant.model.sha, passed=report.passed)
    stage_store.publish(STEP, key)
    return _stored_or(final, report)


def _stored_or(folder, report: RunnabilityReport) -> RunnabilityReport:
    """What is stored (a concurrent identical check may have been committed first), else *report*."""
    try:
        return RunnabilityReport.model_validate(json.loads((folder / REPORT_FILE).read_text()))
    except (OSError, ValueError):
        return report


@task(name="runnability")
def runnability_task(quant: QuantResult, spec: BenchmarkSpec) -> RunnabilityReport | None:
    """``None`` when the check is disabled (the gate then requires nothing)."""
    if not spec.runnability.enabled:
        return None
    return check_runnable(quant=quant, spec=spec)
