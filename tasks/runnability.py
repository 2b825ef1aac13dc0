"""Step 3b — runnability: does the quantized artifact run where users run it?

Right after quantize, the artifact is loaded with plain ``transformers.AutoModelForCausalLM.from_pretrained``
and default settings in a ``python -I`` process that imports no factory code, and generates a few tokens — on
CPU always, on CUDA when this host has a GPU (:func:`modelfactory.benchmark.runnability.check_runs_plainly`).
The report never raises for an artifact that fails: the gate decides (``gate.require_runnable``).

Keyed by the quantized artifact, the versions of the libraries that load it, the check's settings and
the devices it covers; the report (``report.json``) is stored and reused like every step output. A
report whose check died or timed out (stage ``process``: the machine, not the artifact) is not reused.
"""

from __future__ import annotations

import json
from importlib import metadata

from prefect import task

from modelfactory import stage_store
from modelfactory.benchmark.runnability import (
    RunnabilityReport,
    check_runs_plainly,
    resolve_devices,
)
from modelfactory.core import workdir
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.hashing import step_key
from modelfactory.core.log import progress
from modelfactory.core.records import QuantResult
from modelfactory.core.specs import RunnabilitySpec

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


def runnability_key(*, quant: QuantResult, spec: RunnabilitySpec) -> str:
    devices = resolve_devices(spec.devices)
    return step_key(STEP, model=quant.model.sha, versions=_versions(), devices=list(devices),
                    gpu=_gpu_name() if "cuda" in devices else None,
                    spec=spec.model_dump(mode="json", exclude={"enabled", "devices", "timeout_s"}))


def _stored(folder) -> RunnabilityReport:
    try:
        report = RunnabilityReport.model_validate_json((folder / REPORT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"stored runnability report in {folder} is unreadable ({exc})") from exc
    if any(r.stage == "process" for r in report.results):
        raise BenchmarkError(f"the stored runnability check in {folder} died or timed out (not the artifact's doing)")
    return report


def check_runnable(*, quant: QuantResult, spec: RunnabilitySpec) -> RunnabilityReport:
    """The plain-transformers report of *quant*'s artifact (reused when this artifact was checked with the
    same libraries, settings and devices)."""
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
    final = workdir.step_dir(STEP, key)
    with workdir.building(STEP, key) as (tmp, marker):
        report = check_runs_plainly(model_dir=stage_store.resolve(quant.model.path), devices=spec.devices,
                                    timeout_s=spec.timeout_s, new_tokens=spec.new_tokens,
                                    log_path=final.with_suffix(".log"))
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
def runnability_task(quant: QuantResult, spec: RunnabilitySpec) -> RunnabilityReport | None:
    """``None`` when the check is disabled (the gate then requires nothing)."""
    if not spec.enabled:
        return None
    return check_runnable(quant=quant, spec=spec)
