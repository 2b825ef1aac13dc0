"""How far below the full-vocabulary KL the stored top-k + residual KL lies (docs/benchmarks.md,
"KL divergence: what is stored and the error bound"), and fp16 PIQA on a bounded subset.

  python bench/kld_topk_gap.py gap  --model DIR [--quantized GPTQ_DIR | --rtn-bits 4 --rtn-group 128]
                                    [--tokens 2048 --context-len 512 --ks 8,32,128,512] --out FILE
  python bench/kld_topk_gap.py piqa --model DIR --limit 100 --out FILE

``gap``: both models score the same WikiText-2 test windows in this one process; for each k the
top-k + residual KL (``agreement.agreement_terms``) is compared with the full KL over the
vocabulary; the default k also goes through the real writer / scorer files (timed).
Without ``--quantized`` the quantized side is a round-to-nearest copy of the model (every decoder
linear, asymmetric, per group): a cheap stand-in for GPTQ, labelled as such in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from modelfactory.benchmark import agreement
from modelfactory.testing.models import rtn_quantize_


def _load(path: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

    kwargs = {"dtype": dtype}
    qcfg = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    if qcfg:
        torch._dynamo.config.disable = True  # a script of its own: as modelfactory.benchmark.sides.eager_on_cpu
        kwargs["quantization_config"] = GPTQConfig(bits=qcfg["bits"], backend="torch")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def gap(args) -> dict:
    from transformers import AutoTokenizer

    dtype = getattr(torch, args.dtype)
    text = (Path(os.environ["MODELFACTORY_DATA_DIR"]) / "wikitext-2-raw-v1" / "test.txt").read_text()
    ids = AutoTokenizer.from_pretrained(args.model)(text[: args.tokens * 8], add_special_tokens=False)["input_ids"]
    ids = ids[: args.tokens]
    windows = {"context_len": args.context_len, "stride": args.context_len, "device": "cpu"}
    fp = _load(args.model, dtype)
    if args.quantized:
        quant, how = _load(args.quantized, dtype), f"GPTQ {args.quantized}"
    else:
        quant = _load(args.model, dtype)
        rtn_quantize_(quant, bits=args.rtn_bits, group=args.rtn_group)
        how = f"RTN {args.rtn_bits}-bit g{args.rtn_group} (GPTQ stand-in)"

    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        info = agreement.write_reference(Path(tmp) / "ref", agreement.scored_logits(fp, ids, **windows))
        timings["fp16_forward_and_write_s"] = time.perf_counter() - t
        timings["reference_bytes"] = sum(p.stat().st_size for p in (Path(tmp) / "ref").iterdir())
        t = time.perf_counter()
        files = agreement.score_agreement(Path(tmp) / "ref", agreement.scored_logits(quant, ids, **windows))
        timings["quant_forward_and_score_s"] = time.perf_counter() - t

    ref = torch.cat([lg.float() for lg, _ in agreement.scored_logits(fp, ids, **windows)])
    out = torch.cat([lg.float() for lg, _ in agreement.scored_logits(quant, ids, **windows)])
    full = agreement.full_kl(ref, out)
    rows = []
    for k in args.ks:
        top_ids, logp, rest = agreement.topk_logprobs(ref, k=k)
        kl, top1 = agreement.agreement_terms(top_ids, logp, rest, out)
        s = agreement.summarize(kl, top1, rest, top_k=k, vocab_size=ref.shape[-1])
        rows.append({"k": k, "kld_mean": s.kld_mean, "kld_p99": s.kld_p99, "rest_mass_mean": s.rest_mass_mean,
                     "gap_mean": float(full.mean()) - s.kld_mean,
                     "gap_mean_pct": 100 * (float(full.mean()) - s.kld_mean) / float(full.mean()),
                     "max_position_gap": float((full - kl).max()),
                     "bytes_per_position": k * 8 + 8})
    ordered = full.sort().values
    return {"command": " ".join(sys.argv), "model": args.model, "quantized": how, "dtype": args.dtype,
            "positions": info.positions, "full_kld_mean": float(full.mean()),
            "full_kld_p99": agreement._quantile(ordered, 0.99), "top1_agreement_pct": files.top1_agreement_pct,
            "through_files_default_k": files.model_dump(), "timings": timings, "by_k": rows}


def piqa(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelfactory.benchmark import task_eval

    t = time.perf_counter()
    task_eval.check_tasks_available(["piqa_local"])
    check_s = time.perf_counter() - t
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    result = task_eval.evaluate_tasks(model=model, tokenizer=AutoTokenizer.from_pretrained(args.model),
                                      tasks=["piqa_local"], limit=args.limit, batch_size=args.batch_size)
    return {"command": " ".join(sys.argv), "model": args.model, "dtype": args.dtype, "check_s": check_s,
            "wall_s": time.perf_counter() - t, **result.model_dump()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["gap", "piqa"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantized")
    parser.add_argument("--rtn-bits", type=int, default=4)
    parser.add_argument("--rtn-group", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128, 512])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16: what the benchmark uses on CPU")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = gap(args) if args.stage == "gap" else piqa(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
