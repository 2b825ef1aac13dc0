"""Step 5 — gate: compare the benchmark against per-metric thresholds.

Every configured threshold is checked and every failure is reported at once, each with the
fp16 and GPTQ values, so one rejected run tells the whole story.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prefect import task

from modelfactory.core.records import (
    BenchmarkResult,
    GateCheck,
    GateDecision,
    SideMetrics,
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


def evaluate_gate(*, result: BenchmarkResult, spec: GateSpec) -> GateDecision:
    """All configured checks; passed only if every one passes (no thresholds: passes)."""
    checks = [check_metric(field, threshold, result)
              for field, threshold in spec.model_dump(exclude={"min_decode_speedup_by_batch"}).items()
              if threshold is not None]
    checks += [check_decode_speedup(batch, threshold, result)
               for batch, threshold in (spec.min_decode_speedup_by_batch or {}).items()]
    return GateDecision(passed=all(c.passed for c in checks), checks=tuple(checks))


@task(name="gate")
def gate_task(result: BenchmarkResult, spec: GateSpec) -> GateDecision:
    return evaluate_gate(result=result, spec=spec)
