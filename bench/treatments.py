"""Every CUDA-graph decode-step treatment on one loaded model: the worker behind ``bench/gpu_bench.py``.

Used only by the benchmark scripts (the factory's benchmark measures one treatment per side,
:mod:`modelfactory.benchmark.sides`); started as an isolated step process by ``bench/gpu_bench.py``.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from modelfactory.benchmark.decode import reference_decode
from modelfactory.benchmark.fusion import fuse_projections
from modelfactory.benchmark.graph import GRAPH_TREATMENTS, GraphDecoder, GraphTreatment, Treatment, measure_decode_graph
from modelfactory.benchmark.kernels import quantized_kernel_name
from modelfactory.benchmark.memory import MemoryProbe
from modelfactory.benchmark.sides import CHECK_STEPS, load_side
from modelfactory.core.log import progress
from modelfactory.core.records import Side
from modelfactory.core.specs import BenchmarkSpec


def measure_treatments(*, model_path: str, side: Side, spec: dict, treatments: list[GraphTreatment]) -> dict:
    """Worker body for the GPU benchmark script: one load, every decode-step treatment in order.

    Each treatment is checked against the same eager reference (taken before any fusion) and
    timed like :func:`modelfactory.benchmark.sides.measure_side`. Fusing treatments change the model in place, so list the
    unfused ones first. Returns ``{"load_s", "mem_after_load_bytes", "kernel", "reference_tokens",
    "treatments": {name: {...}}}``.
    """
    import gptqmodel  # noqa: F401
    import torch
    from transformers import AutoTokenizer

    bspec = BenchmarkSpec.model_validate(spec)
    dspec = bspec.decode
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = tokenizer(dspec.prompt, return_tensors="pt")["input_ids"].to("cuda")
    probe = MemoryProbe(device="cuda")
    start = time.perf_counter()
    model, _ = load_side(model_path, side=side, spec=bspec, device="cuda", dtype=torch.float16)
    result = {"side": side, "load_s": time.perf_counter() - start, "mem_after_load_bytes": probe.current(),
              "kernel": quantized_kernel_name(model) if side == "gptq" else "dense", "treatments": {}}
    ref_tokens, ref_logits = reference_decode(model, input_ids=prompt_ids, steps=CHECK_STEPS)
    result["reference_tokens"] = ref_tokens
    fused: Treatment | None = None  # the fusion the model has, once a fusing treatment ran
    for name in treatments:
        opts = GRAPH_TREATMENTS[name]
        row: dict = {}
        try:
            if opts.fuse and fused is None:
                row["fused_modules"] = fuse_projections(model, marlin_atomics=opts.marlin_atomics)
                fused = opts
            if fused is not None and (not opts.fuse or fused.marlin_atomics != opts.marlin_atomics):
                raise ValueError("treatment needs another fusion than the model already has: run it in its own process")
            probe.reset_peak()
            decoder = GraphDecoder(model, input_ids=prompt_ids, max_new_tokens=dspec.new_tokens,
                                         compile=opts.compile)
            row["compile_s"] = decoder.compile_s
            check = decoder.check(ref_tokens=ref_tokens, ref_logits=ref_logits)
            row["check"] = asdict(check)
            row["check_passed"] = check.passed
            ttft_s, tok_s, out = measure_decode_graph(model, input_ids=prompt_ids, new_tokens=dspec.new_tokens,
                                                            warmup=dspec.warmup, repeats=dspec.repeats,
                                                            decoder=decoder)
            row.update(decode_tok_s=tok_s, ttft_ms=ttft_s * 1000, mem_peak_decode_bytes=probe.peak(),
                       mem_now_bytes=probe.current(), sample_text=tokenizer.decode(out[0], skip_special_tokens=True)[:200])
            del decoder
        except Exception as exc:  # reported, not fatal: the other treatments still run
            import traceback

            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            row["traceback"] = traceback.format_exc()[-3000:]
        torch.cuda.empty_cache()
        progress(f"benchmark[{side}] {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()
                                                           if k not in ("traceback", "sample_text")))
        result["treatments"][name] = row
    return result
