"""A benchmark result as catalog metric rows: each side's measurements and the fp16 → GPTQ ratios."""

from __future__ import annotations

from modelfactory.catalog.records import MetricRecord
from modelfactory.core.records import BenchmarkResult

#: SideMetrics fields recorded as metrics, with their units.
SIDE_METRICS = {
    "perplexity": "ppl", "decode_tok_s": "tok/s", "ttft_ms": "ms", "disk_bytes": "B", "load_s": "s",
    "mem_after_load_bytes": "B", "mem_peak_decode_bytes": "B", "mem_peak_bytes": "B",
}
RATIO_UNITS = {"ppl_increase_pct": "%", "decode_speedup": "x", "size_ratio": "x", "memory_ratio": "x"}


def benchmark_metrics(result: BenchmarkResult) -> list[MetricRecord]:
    metrics = []
    for side in (result.fp16, result.gptq):
        for name, unit in SIDE_METRICS.items():
            value = getattr(side, name)
            if value is not None:
                metrics.append(MetricRecord(name=name, side=side.side, value=float(value), unit=unit))
        # decode_tok_s_b<N>: decode tok/s at batch size N > 1 (batch 1 is decode_tok_s)
        metrics += [MetricRecord(name=f"decode_tok_s_b{batch}", side=side.side, value=float(rate), unit="tok/s")
                    for batch, rate in sorted(side.decode_tok_s_by_batch.items()) if batch != 1]
    for name, value in result.ratios().items():
        if value is not None:
            metrics.append(MetricRecord(name=name, side="delta", value=float(value), unit=_ratio_unit(name)))
    return metrics


def _ratio_unit(name: str) -> str:
    # decode_speedup_b<N>: the decode speed-up at batch size N (BenchmarkResult.ratios)
    return "x" if name.startswith("decode_speedup_b") else RATIO_UNITS[name]


def manifest_metrics(result: BenchmarkResult) -> dict[str, object]:
    """The ``metrics`` of an artifact's manifest: both sides' records (``fp16``, ``gptq``), the
    fp16 → GPTQ ``ratios``, and ``measured``: every metric row the catalog records for this result
    (:func:`benchmark_metrics`: ``{name, side, value, unit}``), so whatever the benchmark measures
    (KL divergence, task scores, decode per batch size, ...) is published without this list naming it.
    """
    rows = benchmark_metrics(result)
    ratios: dict[str, float | None] = {**result.ratios(), **{m.name: m.value for m in rows if m.side == "delta"}}
    return {"fp16": result.fp16.model_dump(mode="json"), "gptq": result.gptq.model_dump(mode="json"),
            "ratios": ratios, "measured": [m.to_dict() for m in rows]}
