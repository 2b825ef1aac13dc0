"""GPU check of the batched CUDA-graph decoder (``benchmark.decode.batch_sizes``) on a small fp16 Llama.

For each batch size: the graph decoder's free-running greedy tokens against HF ``generate`` (eager,
the same batch of the prompt repeated), its :class:`~modelfactory.benchmark.graph.DecodeCheck`
against the batch-1 eager reference, then the benchmark's own per-batch loop
(``modelfactory.benchmark.sides.graph_decode_checked``) for each treatment: tok/s per batch size.

Needs torch, transformers and pydantic(-settings) only (random weights, token ids as the prompt;
no tokenizer, no gptqmodel, no prefect: a stand-in ``prefect.task`` is installed when Prefect is
missing, as the decode loop does not use it). Writes ``$OUT/graph_batch_check.json`` (or ``--out``).

    python3 bench/graph_batch_check.py --batch-sizes 1 8 32 --new-tokens 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path


def _prefect_stand_in() -> None:
    if importlib.util.find_spec("prefect") is None:
        stub = types.ModuleType("prefect")
        stub.task = lambda *args, **kwargs: (lambda fn: fn)
        sys.modules["prefect"] = stub


def small_llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.float16).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--treatments", nargs="+", default=["graph", "fused_graph", "fused_compiled_graph"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    _prefect_stand_in()

    import torch

    from modelfactory import benchmark as bench
    from modelfactory.core.specs import DecodeSpec
    from modelfactory.benchmark.sides import CHECK_STEPS, graph_decode_checked

    out = Path(args.out) / "graph_batch_check.json"
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "batch_sizes": args.batch_sizes, "new_tokens": args.new_tokens, "eager_vs_graph": {},
                    "treatments": {}}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    model = small_llama(0)
    prompt = torch.randint(100, 31000, (1, 12), generator=torch.Generator().manual_seed(1)).cuda()
    ref_tokens, ref_logits = bench.reference_decode(model, input_ids=prompt, steps=CHECK_STEPS)
    with torch.inference_mode():
        for batch in args.batch_sizes:
            ids = bench.batch_prompt(prompt, batch)
            eager = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=0)[:, ids.shape[1]:].cpu()
            decoder = bench.GraphDecoder(model, input_ids=ids, max_new_tokens=args.new_tokens)
            check = decoder.check(ref_tokens=ref_tokens, ref_logits=ref_logits)
            graph = torch.cat(decoder.generate(args.new_tokens)[2], dim=1).cpu()
            same = graph == eager
            prefixes = [next((i for i, s in enumerate(row.tolist()) if not s), args.new_tokens) for row in same]
            row = {"tokens_equal": bool(same.all()), "token_agreement": float(same.float().mean()),
                   "min_matching_prefix": min(prefixes), "rows_identical": bool((graph == graph[:1]).all()),
                   "eager_row0_head": eager[0, :12].tolist(), "graph_row0_head": graph[0, :12].tolist(),
                   "check": {k: getattr(check, k) for k in check.__dataclass_fields__}, "check_passed": check.passed}
            report["eager_vs_graph"][batch] = row
            print(f"batch {batch}: graph == eager generate: {row['tokens_equal']} "
                  f"(agreement {row['token_agreement']:.3f}, prefix {row['min_matching_prefix']}), "
                  f"check passed {check.passed}: {row['check']}", flush=True)
            save()
            del decoder
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()

    dspec = DecodeSpec(new_tokens=args.new_tokens, batch_sizes=tuple(args.batch_sizes), warmup=1, repeats=3)
    for treatment in args.treatments:
        model = small_llama(0)
        probe = bench.MemoryProbe(device="cuda")
        start = time.perf_counter()
        try:
            model, decoded, used, checks = graph_decode_checked(
                model, prompt_ids=prompt, dspec=dspec, treatment=treatment, probe=probe,
                reload=lambda: small_llama(0))
            row = {"used": used, "tok_s": {b: d.tok_s for b, d in decoded.items()},
                   "ttft_ms_b1": decoded[1].ttft_s * 1000, "wall_s": time.perf_counter() - start,
                   "checks": {b: {k: getattr(c, k) for k in c.__dataclass_fields__} for b, c in checks.items()}}
        except Exception as exc:  # reported: the other treatments still run
            row = {"error": f"{type(exc).__name__}: {exc}"[:2000], "wall_s": time.perf_counter() - start}
        report["treatments"][treatment] = row
        print(f"{treatment}: " + json.dumps({k: v for k, v in row.items() if k != "checks"}), flush=True)
        save()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
