"""A benchmark result as catalog metric rows: each side's measurements and the fp16 → GPTQ ratios.

The metric names are a contract with the catalog queries, the leaderboard and the model card:

- per side (``fp16``/``gptq``): :data:`SIDE_METRICS`, ``decode_tok_s_b<N>`` per decode batch size N > 1
  (batch 1 is ``decode_tok_s``, as ``decode_speedup`` is the batch-1 ratio),
  and per lm-eval task ``task_<task>_acc``, ``task_<task>_acc_stderr``, ``task_<task>_acc_norm``,
  ``task_<task>_acc_norm_stderr`` (those the task reports);
- ``delta``: every entry of :meth:`BenchmarkResult.ratios` — ``ppl_increase_pct``, ``decode_speedup``,
  ``decode_speedup_b<N>``, ``size_ratio``, ``memory_ratio``, ``kld_mean``, ``kld_p99``,
  ``top1_agreement_pct``, ``task_recovery_pct`` (the smallest over tasks), ``task_recovery_pct_<task>``.
"""

from __future__ import annotations

from modelfactory.catalog.records import MetricRecord
from modelfactory.core.records import BenchmarkResult, SideMetrics

#: SideMetrics fields recorded as metrics, with their units.
SIDE_METRICS = {
    "perplexity": "ppl", "decode_tok_s": "tok/s", "ttft_ms": "ms", "disk_bytes": "B", "load_s": "s",
    "mem_after_load_bytes": "B", "mem_peak_decode_bytes": "B", "mem_peak_bytes": "B",
}
#: Per-task lm-eval fields recorded as ``task_<task>_<field>`` (fractions, 0..1).
TASK_FIELDS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
RATIO_UNITS = {"ppl_increase_pct": "%", "decode_speedup": "x", "size_ratio": "x", "memory_ratio": "x",
               "kld_mean": "nats", "kld_p99": "nats", "top1_agreement_pct": "%", "task_recovery_pct": "%"}


def task_metric_name(task: str, field: str) -> str:
    return f"task_{task}_{field}"


def decode_rate_name(batch: int) -> str:
    return f"decode_tok_s_b{batch}"


def side_metrics(side: SideMetrics) -> list[MetricRecord]:
    rows = [MetricRecord(name=name, side=side.side, value=float(value), unit=unit)
            for name, unit in SIDE_METRICS.items() if (value := getattr(side, name)) is not None]
    rows += [MetricRecord(name=decode_rate_name(batch), side=side.side, value=float(rate), unit="tok/s")
             for batch, rate in sorted(side.decode_tok_s_by_batch.items()) if batch != 1]
    for task, scores in sorted(side.tasks.items()):
        rows += [MetricRecord(name=task_metric_name(task, field), side=side.side, value=float(value), unit="frac")
                 for field in TASK_FIELDS if (value := getattr(scores, field)) is not None]
    return rows


def benchmark_metrics(result: BenchmarkResult) -> list[MetricRecord]:
    metrics = side_metrics(result.fp16) + side_metrics(result.gptq)
    for name, value in result.ratios().items():
        if value is not None:
            metrics.append(MetricRecord(name=name, side="delta", value=float(value), unit=_ratio_unit(name)))
    return metrics


def _ratio_unit(name: str) -> str:
    # decode_speedup_b<N>: the decode speed-up at batch size N; task_recovery_pct_<task>: one task's recovery
    if name.startswith("decode_speedup_b"):
        return "x"
    if name.startswith("task_recovery_pct_"):
        return "%"
    return RATIO_UNITS[name]


def manifest_metrics(result: BenchmarkResult) -> dict[str, object]:
    """The ``metrics`` of an artifact's manifest: both sides' records (``fp16``, ``gptq``), the
    fp16 → GPTQ ``ratios``, and ``measured``: every metric row the catalog records for this result
    (:func:`benchmark_metrics`: ``{name, side, value, unit}``), so whatever the benchmark measures
    (KL divergence, task scores, decode per batch size, ...) is published without this list naming it.
    """
    rows = benchmark_metrics(result)
    ratios: dict[str, float | None] = {**result.ratios(), **{m.name: m.value for m in rows if m.side == "delta"}}
    return {"fp16": result.fp16.model_dump(mode="json"), "gptq": result.gptq.model_dump(mode="json"),
            "agreement": result.agreement.model_dump(mode="json") if result.agreement else None,
            "ratios": ratios, "measured": [m.to_dict() for m in rows]}
