"""Step 5 — gate: compare the benchmark against per-metric thresholds, and require a runnable artifact.

The thresholds in effect are the spec's, the unset ones from its preset (:meth:`GateSpec.in_effect`: the
default gate unless ``preset: none``). Every one is checked and every failure is reported at once, each
with the fp16 and GPTQ values (``not measured`` when a threshold's metric is missing, or when a KL is only
a lower bound: a lower bound would lean towards passing a maximum), so one rejected run tells the whole
story. The runnability report (``modelfactory.tasks.runnability``) fails the gate when no standard loading
path works on a device, or one computes something else than the measured model; and then it does so
before the benchmark (:func:`decide_before_benchmark`), which is not run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prefect import task

from modelfactory.benchmark.runnability import RunnabilityReport
from modelfactory.core.records import (
    BenchmarkResult,
    GateCheck,
    GateDecision,
    SideMetrics,
    task_recovery_name,
)
from modelfactory.core.specs import GateSpec

#: gate field -> (ratio name in BenchmarkResult.ratios(), side value, "max"|"min", unit label)
_RULES: dict[str, tuple[str, Callable[[SideMetrics], float | None], str, str]] = {
    "max_ppl_increase_pct": ("ppl_increase_pct", lambda s: s.perplexity, "max", "perplexity increase %"),
    "min_decode_speedup": ("decode_speedup", lambda s: s.decode_tok_s, "min", "decode speed-up x"),
    # min_decode_speedup_by_batch: one check per batch size (check_decode_speedup)
    "max_size_ratio": ("size_ratio", lambda s: float(s.disk_bytes), "max", "disk size ratio"),
    "max_memory_ratio": ("memory_ratio", lambda s: float(s.mem_after_load_bytes), "max", "memory ratio"),
}
#: Agreement thresholds: gate field -> (ratio name, "max"|"min", label). Measured between the sides, so
#: the message's fp16/gptq values are the reference (0 KL, 100 % agreement) and the GPTQ value.
_AGREEMENT_RULES: dict[str, tuple[str, str, str, float]] = {
    "max_kld_mean": ("kld_mean", "max", "mean KL(fp16||gptq) nats", 0.0),
    "max_kld_p99": ("kld_p99", "max", "p99 KL(fp16||gptq) nats", 0.0),
    "min_top1_agreement_pct": ("top1_agreement_pct", "min", "top-1 agreement %", 100.0),
}
#: GateSpec fields not checked by the generic per-ratio loop.
_SPECIAL_FIELDS = {"preset", "min_decode_speedup_by_batch", "min_task_recovery_pct", "require_runnable",
                   "require_default_path", *_AGREEMENT_RULES}
#: Ratios are computed in floating point ((11 / 10 - 1) * 100 == 10.000000000000009): an observed value
#: this close to its threshold (relative) is equal to it, and thresholds are inclusive.
_REL_TOL = 1e-9


def check_metric(field: str, threshold: float, result: BenchmarkResult) -> GateCheck:
    ratio_name, value_of, direction, label = _RULES[field]
    return _check(field, threshold, observed=result.ratios()[ratio_name], baseline=value_of(result.fp16),
                  candidate=value_of(result.gptq), direction=direction, label=label)


def check_decode_speedup(batch: int, threshold: float, result: BenchmarkResult) -> GateCheck:
    """``min_decode_speedup_by_batch[batch]``, as metric ``min_decode_speedup_b<batch>`` (batch 1 too: it may
    be set next to ``min_decode_speedup``, and a run's metric names are unique)."""
    return _check(f"min_decode_speedup_b{batch}", threshold, observed=result.decode_speedup(batch),
                  baseline=result.fp16.decode_rate(batch), candidate=result.gptq.decode_rate(batch),
                  direction="min", label=f"decode speed-up x at batch {batch}")


def check_agreement(field: str, threshold: float, result: BenchmarkResult) -> GateCheck:
    """``max_kld_mean`` / ``max_kld_p99`` / ``min_top1_agreement_pct`` (not measured: agreement was off). A KL
    that is only the top-k lower bound is reported in the message but not gated: it would lean towards passing."""
    ratio_name, direction, label, reference = _AGREEMENT_RULES[field]
    observed = result.ratios().get(ratio_name)
    agreement = result.agreement
    if observed is not None and agreement is not None and agreement.kld_is_lower_bound and ratio_name.startswith("kld"):
        label += (f" (only a top-{agreement.top_k} lower bound was measured, {observed:.4g}: "
                  f"{agreement.kld_method_note or 'the exact KL needs the fp16 model next to the GPTQ one'})")
        observed = None
    elif observed is not None and agreement is not None and ratio_name.startswith("kld"):
        label += f" ({agreement.kld_method}, kernel {agreement.kernel or result.gptq.kernel})"
    return _check(field, threshold, observed=observed, baseline=reference if observed is not None else None,
                  candidate=observed, direction=direction, label=label)


def check_task_recovery(task: str, threshold: float, result: BenchmarkResult) -> GateCheck:
    """``min_task_recovery_pct`` for one task, as metric ``min_task_recovery_pct_<task>``: GPTQ / fp16 score in %
    (:meth:`~modelfactory.core.records.BenchmarkResult.task_recovery`: acc_norm when both sides have it, else acc)."""
    fp16, gptq = result.fp16.tasks.get(task), result.gptq.tasks.get(task)
    metric = (fp16 or gptq).primary[0] if (fp16 or gptq) else "acc_norm"
    return _check(f"min_{task_recovery_name(task)}", threshold, observed=result.task_recovery(task),
                  baseline=fp16.primary[1] if fp16 else None, candidate=gptq.primary[1] if gptq else None,
                  direction="min", label=f"{task} {metric} recovery %")


def task_thresholds(spec: GateSpec, result: BenchmarkResult) -> dict[str, float]:
    """``min_task_recovery_pct`` per task: a number applies to every task either side evaluated."""
    minimum = spec.min_task_recovery_pct
    if minimum is None:
        return {}
    if isinstance(minimum, dict):
        return dict(minimum)
    tasks = sorted(set(result.fp16.tasks) | set(result.gptq.tasks))
    # No task evaluated at all: one check that fails as not measured (a threshold is never silently skipped).
    return {task: minimum for task in tasks} or {"all": minimum}


def check_runnability(report: RunnabilityReport) -> GateCheck:
    """``require_runnable``: no device broken, one at least verified through a standard loading path (1 = yes)."""
    passed = report.passed
    message = (f"runs in plain transformers ({report.summary()})" if passed else
               f"does not run correctly in plain transformers: {report.summary()}")
    return GateCheck(metric="require_runnable", threshold=1.0, baseline=None, candidate=1.0 if passed else 0.0,
                     observed=1.0 if passed else 0.0, passed=passed, message=message)


def check_default_path(report: RunnabilityReport) -> GateCheck:
    """``require_default_path``: the library's default loading path works on every device checked (1 = yes)."""
    passed = report.default_path_works
    failing = [f"{v.device}: {v.reason}" for v in report.devices if not v.default_ok]
    message = ("the default loading path works on every device checked" if passed else
               "the default loading path does not work everywhere: " + ("; ".join(failing) or report.summary()))
    return GateCheck(metric="require_default_path", threshold=1.0, baseline=None, candidate=1.0 if passed else 0.0,
                     observed=1.0 if passed else 0.0, passed=passed, message=message)


def runnability_checks(spec: GateSpec, report: RunnabilityReport | None) -> list[GateCheck]:
    """The checks of the runnability report that *spec* (in effect) asks for; none when the check was disabled."""
    if report is None:
        return []
    return ([check_runnability(report)] if spec.require_runnable else []) + (
        [check_default_path(report)] if spec.require_default_path else [])


def decide_before_benchmark(*, spec: GateSpec, runnability: RunnabilityReport | None) -> GateDecision | None:
    """The decision to stop at, right after the runnability check: a rejection when a required runnability check
    fails (the benchmark is then not run), else ``None`` (go on)."""
    checks = runnability_checks(spec.in_effect(), runnability)
    if all(check.passed for check in checks):
        return None
    return GateDecision(passed=False, checks=tuple(checks))


def _check(metric: str, threshold: float, *, observed: float | None, baseline: float | None,
           candidate: float | None, direction: str, label: str) -> GateCheck:
    if observed is None:
        passed, verdict = False, "not measured"
    elif direction == "max":
        passed = observed <= threshold or math.isclose(observed, threshold, rel_tol=_REL_TOL)
        verdict = f"{observed:.4g} {'<=' if passed else '>'} {threshold:g}"
    else:
        passed = observed >= threshold or math.isclose(observed, threshold, rel_tol=_REL_TOL)
        verdict = f"{observed:.4g} {'>=' if passed else '<'} {threshold:g}"
    message = f"{label}: {verdict} (fp16 {_fmt(baseline)}, gptq {_fmt(candidate)})"
    return GateCheck(metric=metric, threshold=threshold, baseline=baseline, candidate=candidate, observed=observed,
                     passed=passed, message=message)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def evaluate_gate(*, result: BenchmarkResult, spec: GateSpec,
                  runnability: RunnabilityReport | None = None) -> GateDecision:
    """Every check in effect (:meth:`GateSpec.in_effect`: the spec's thresholds, the rest from its preset);
    passed only if every one passes (no check at all: passes).

    *runnability*: the plain-transformers report of the artifact (``None``: the check was disabled,
    so there is nothing to require); with ``require_runnable`` a failed report fails the gate.
    """
    spec = spec.in_effect()
    checks = [check_metric(field, threshold, result)
              for field, threshold in spec.model_dump(exclude=_SPECIAL_FIELDS).items()
              if threshold is not None]
    checks += [check_decode_speedup(batch, threshold, result)
               for batch, threshold in (spec.min_decode_speedup_by_batch or {}).items()]
    checks += [check_agreement(field, getattr(spec, field), result)
               for field in _AGREEMENT_RULES if getattr(spec, field) is not None]
    checks += [check_task_recovery(task, threshold, result)
               for task, threshold in task_thresholds(spec, result).items()]
    checks += runnability_checks(spec, runnability)
    return GateDecision(passed=all(c.passed for c in checks), checks=tuple(checks))


@task(name="gate")
def gate_task(result: BenchmarkResult, spec: GateSpec, runnability: RunnabilityReport | None = None) -> GateDecision:
    return evaluate_gate(result=result, spec=spec, runnability=runnability)
