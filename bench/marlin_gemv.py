"""Batch-1 GEMV microbenchmark: GPTQModel's Marlin (4-bit, group 128) vs cuBLAS fp16, per Llama-2-7B shape.

Per shape: the achieved bandwidth (weight bytes read / time) of one GEMV, with enough weight copies
rotated that they do not stay in the 50 MB L2 (as in a real decode step, where every layer has its
own weights), timed as replays of a CUDA graph of 32 calls (median of 20 replays). Marlin variants:
fp32 vs fp16 global reduce, atomic-add reduce. Checks: Marlin output vs an fp32 dequantized
reference, and that Marlin-packing concatenated q/k/v (gate/up) weights equals concatenating the
separately packed weights (the assumption behind ``modelfactory.benchmark.fusion.FusedMarlinLinear``).

Usage (GPU machine, after ``source bench/gpu_env.sh``): python bench/marlin_gemv.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

SHAPES = {  # name: (K, N) of y[1, N] = x[1, K] @ W[K, N]
    "q|k|v|o (4096x4096)": (4096, 4096),
    "qkv fused (4096x12288)": (4096, 12288),
    "gate|up (4096x11008)": (4096, 11008),
    "gate_up fused (4096x22016)": (4096, 22016),
    "down (11008x4096)": (11008, 4096),
    "lm_head (4096x32000)": (4096, 32000),
}
GROUP = 128
L2_ROTATE_BYTES = 256 * 1024**2


def _gptq_weights(k: int, n: int, gen):
    import torch

    q = torch.randint(0, 16, (k, n), dtype=torch.int32, device="cuda", generator=gen)
    packed = torch.zeros((k // 8, n), dtype=torch.int32, device="cuda")
    for j in range(8):
        packed |= q[j::8] << (4 * j)
    scales = (torch.rand((k // GROUP, n), device="cuda", generator=gen) * 0.02 + 0.005).half()
    return q, packed, scales


def _marlin_pack(packed, scales, k: int, n: int):
    import torch
    from gptqmodel.utils.marlin import gptq_marlin_repack, marlin_permute_scales

    empty = torch.empty(0, dtype=torch.int, device="cuda")
    return (gptq_marlin_repack(packed, perm=empty, size_k=k, size_n=n, num_bits=4, dtype=torch.float16),
            marlin_permute_scales(scales, size_k=k, size_n=n, group_size=GROUP))


def _time_graph(fn, copies: int, calls: int = 32, replays: int = 20) -> float:
    """Median microseconds per call of fn(i % copies) captured `calls` times in one CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    times = []
    for _ in range(replays + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times[2:])


def main() -> None:
    from modelfactory.core.devices import gpu_env

    os.environ.update(gpu_env())  # the factory's Marlin JIT cache
    import torch
    from gptqmodel.utils.marlin import gptq_marlin_gemm, marlin_make_workspace_new
    from gptqmodel.utils.marlin_scalar_type import scalar_types

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    empty = torch.empty(0, dtype=torch.int, device="cuda")
    workspace = marlin_make_workspace_new(torch.device("cuda"))
    result = {"gpu": torch.cuda.get_device_name(), "group_size": GROUP, "shapes": {}}

    # Fusion check: pack(cat) == cat(pack) for q/k/v-like parts.
    parts = [_gptq_weights(4096, 4096, gen) for _ in range(3)]
    cat_packed = torch.cat([p[1] for p in parts], dim=1)
    cat_scales = torch.cat([p[2] for p in parts], dim=1)
    whole = _marlin_pack(cat_packed, cat_scales, 4096, 12288)
    separate = [_marlin_pack(p[1], p[2], 4096, 4096) for p in parts]
    result["fusion_layout_check"] = {
        "qweight_equal": bool(torch.equal(whole[0], torch.cat([s[0] for s in separate], dim=1))),
        "scales_equal": bool(torch.equal(whole[1], torch.cat([s[1] for s in separate], dim=1)))}
    print("fusion layout check", result["fusion_layout_check"], flush=True)
    del parts, whole, separate

    for name, (k, n) in SHAPES.items():
        q, packed, scales = _gptq_weights(k, n, gen)
        mq, ms = _marlin_pack(packed, scales, k, n)
        q_bytes = mq.numel() * 4 + ms.numel() * 2
        copies = max(2, -(-L2_ROTATE_BYTES // q_bytes))
        mqs = [mq] + [mq.clone() for _ in range(copies - 1)]
        mss = [ms] + [ms.clone() for _ in range(copies - 1)]
        x = torch.randn((1, k), dtype=torch.float16, device="cuda", generator=gen)
        w_ref = ((q - 8).float() * scales.float().repeat_interleave(GROUP, dim=0))  # [K, N]
        ref = x.float() @ w_ref
        row = {"K": k, "N": n, "marlin_bytes": q_bytes, "fp16_bytes": k * n * 2, "weight_copies": copies}

        def marlin(i, fp32=True, atomics=False):
            return gptq_marlin_gemm(x, None, mqs[i], None, mss[i], None, empty, empty, empty, workspace,
                                    scalar_types.uint4b8, size_m=1, size_n=n, size_k=k, is_k_full=True,
                                    use_atomic_add=atomics, use_fp32_reduce=fp32, is_zp_float=False)

        for label, kw in (("marlin_fp32_reduce", {}), ("marlin_fp16_reduce", {"fp32": False}),
                          ("marlin_atomic_add", {"atomics": True})):
            try:
                out = marlin(0, **kw).float()
                err = float((out - ref).norm() / ref.norm())
                us = _time_graph(lambda i, kw=kw: marlin(i, **kw), copies)
                row[label] = {"us": us, "gb_s": q_bytes / us / 1e3, "rel_err_vs_fp32_dequant": err}
            except Exception as exc:  # a variant the kernel refuses is reported
                row[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        del mqs, mss, q, packed, w_ref
        w16 = (torch.randn((n, k), dtype=torch.float16, device="cuda", generator=gen) * 0.02)
        fp16_copies = max(2, -(-L2_ROTATE_BYTES // (k * n * 2)))
        ws = [w16] + [w16.clone() for _ in range(fp16_copies - 1)]
        us = _time_graph(lambda i: torch.nn.functional.linear(x, ws[i]), fp16_copies)
        row["cublas_fp16"] = {"us": us, "gb_s": k * n * 2 / us / 1e3, "weight_copies": fp16_copies}
        del ws, w16
        torch.cuda.empty_cache()
        result["shapes"][name] = row
        print(f"{name:28s} " + "  ".join(f"{lbl} {v['us']:.1f}us {v['gb_s']:.0f}GB/s" for lbl, v in row.items()
                                         if isinstance(v, dict) and "us" in v), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "llama2-7b-shape-marlin-gemv-microbench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
