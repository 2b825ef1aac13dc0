"""GPU benchmarks with the factory's own steps: ``modelfactory.tasks.quantize.quantize_model`` and
``modelfactory.benchmark.sides.measure_side`` (each side in its own worker process, as in a factory run).

Stages (run on the GPU machine; see docs/benchmarks.md for the exact commands):

  python bench/gpu_bench.py bandwidth            --out DIR
  python bench/gpu_bench.py smollm2   --gguf F   --out DIR
  python bench/gpu_bench.py llama7b-make
  python bench/gpu_bench.py llama7b-quantize     --out DIR
  python bench/gpu_bench.py llama7b-bench --kernels auto,gptq_marlin,... --out DIR
  python bench/gpu_bench.py llama7b-profile [--treatment fused_compiled_graph] --out DIR
  python bench/gpu_bench.py marlin-prewarm       (Marlin JIT on the CPU, e.g. while quantizing)
  python bench/gpu_bench.py llama7b-treatments --sides fp16|gptq [--treatments a,b] --out DIR
  python bench/gpu_bench.py treatments-summary --inputs FP16_JSON,GPTQ_JSON --out bench/results

Every stage writes one JSON file per measured configuration under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GIB = 1024**3
LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def _home() -> Path:
    return Path(os.environ.get("MODELFACTORY_HOME", "/root/mfhome"))


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name()


def copy_bandwidth_gbs(size_gib: float = 4.0, iters: int = 20) -> float:
    """Device-to-device copy rate, counting bytes read + bytes written (median of *iters*)."""
    import torch

    n = int(size_gib * GIB) // 2
    src = torch.randn(n, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times = sorted(times[3:])
    return 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9


def _side(model_path: str, side: str, spec: dict, log: Path) -> dict:
    from modelfactory.benchmark.sides import measure_side
    from modelfactory.core.devices import gpu_env
    from modelfactory.core.isolation import run_isolated
    from modelfactory.core.specs import BenchmarkSpec
    from modelfactory.sources.text import load_text

    text, origin = load_text(BenchmarkSpec.model_validate(spec).perplexity.text)
    return run_isolated(measure_side, kwargs={"model_path": model_path, "side": side, "spec": spec, "text": text,
                                              "text_origin": origin}, log_path=log, env=gpu_env())


def _summary(fp16: dict, gptq: dict, **extra) -> dict:
    def view(m: dict) -> dict:
        return {"decode_tok_s": m["decode_tok_s"], "ttft_ms": m["ttft_ms"], "decode_mode": m["decode_mode"],
                "vram_after_load_gib": m["mem_after_load_bytes"] / GIB, "vram_peak_gib": m["mem_peak_decode_bytes"] / GIB,
                "vram_peak_all_gib": m["mem_peak_bytes"] / GIB, "disk_gb": m["disk_bytes"] / 1e9,
                "perplexity": m["perplexity"], "ppl_tokens": m["ppl_tokens"], "kernel": m["kernel"],
                "load_s": m["load_s"], "sample_text": m["sample_text"][:200]}

    return {"gpu": _gpu(), "command": " ".join(sys.argv), **extra, "fp16": view(fp16), "gptq": view(gptq),
            "decode_speedup": gptq["decode_tok_s"] / fp16["decode_tok_s"],
            "vram_ratio": gptq["mem_after_load_bytes"] / fp16["mem_after_load_bytes"]}


def _write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(json.dumps({k: v for k, v in data.items() if k not in ("fp16", "gptq")}, indent=None)[:600], flush=True)


# --------------------------------------------------------------------------- stages
def stage_smoke(args) -> None:
    """CUDA-graph decode == HF generate (greedy tokens) on a small random fp16 Llama; bandwidth."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modelfactory import benchmark as bench

    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA7B, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                            "num_attention_heads": 8, "num_key_value_heads": 8}, pad_token_id=2, eos_token_id=2)
    model = LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    ids = AutoTokenizer.from_pretrained(args.tokenizer)("The history of the city began", return_tensors="pt")
    ids = ids["input_ids"].cuda()
    t1e, rate_e, out_e = bench.measure_decode(model, input_ids=ids, new_tokens=64, warmup=1, repeats=3, device="cuda")
    t1g, rate_g, out_g = bench.measure_decode_graph(model, input_ids=ids, new_tokens=64, warmup=1, repeats=3)
    same = (out_e[0, ids.shape[1]:] == out_g[0, ids.shape[1]:].to(out_e.device)).float().mean().item()
    _write(Path(args.out), "smoke", {"gpu": _gpu(), "command": " ".join(sys.argv), "eager_tok_s": rate_e,
                                     "graph_tok_s": rate_g, "ttft_eager_ms": t1e * 1000, "ttft_graph_ms": t1g * 1000,
                                     "greedy_token_agreement": same, "copy_gb_s": copy_bandwidth_gbs()})


def stage_bandwidth(args) -> None:
    gbs = copy_bandwidth_gbs()
    _write(Path(args.out), "bandwidth", {"gpu": _gpu(), "command": " ".join(sys.argv), "copy_gb_s": gbs})


def stage_smollm2(args) -> None:
    from modelfactory.core.specs import BenchmarkSpec, ModelSource, QuantSpec
    from modelfactory.tasks.download import download_model
    from modelfactory.tasks.quantize import quantize_model

    base = download_model(source=ModelSource(uri=args.gguf))
    qspec = QuantSpec(bits=4, group_size=128, calibration={"num_samples": 128, "seq_len": 512})
    quant = quantize_model(model=base, spec=qspec)
    for label, max_tokens in (("full", None), ("16k", 16384)):
        spec = BenchmarkSpec(perplexity={"context_len": 512, "stride": 512, "max_tokens": max_tokens},
                             decode={"new_tokens": 256, "repeats": 3}).model_dump(mode="json")
        log = _home() / "logs" / f"smollm2-{label}.log"
        fp16, gptq = _side(base.path, "fp16", spec, log), _side(quant.model.path, "gptq", spec, log)
        _write(Path(args.out), f"smollm2-135m-gptq-4bit-128g-{label}", _summary(
            fp16, gptq, model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp16)", quantize_s=quant.quantize_s,
            quant_spec=qspec.model_dump(mode="json"), perplexity_method=spec["perplexity"],
            perplexity_text="WikiText-2 raw test split (whole file)" if max_tokens is None else
            f"WikiText-2 raw test split, first {max_tokens} tokens"))


def _llama7b_dir() -> Path:
    return _home() / "llama7b-random-fp16"


def stage_llama7b_make(args) -> None:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = _llama7b_dir()
    if (out / "config.json").is_file():
        print(f"{out} exists")
        return
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA7B, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out)
    for f in Path(args.tokenizer).iterdir():
        shutil.copy2(f, out / f.name)
    print(f"made {out} in {time.perf_counter() - start:.0f} s", flush=True)


def _llama7b_quant_spec():
    from modelfactory.core.specs import QuantSpec

    return QuantSpec(bits=4, group_size=128, calibration={"num_samples": 128, "seq_len": 2048})


def stage_llama7b_quantize(args) -> None:
    from modelfactory.core.records import ModelArtifact
    from modelfactory.tasks.quantize import quantize_model

    base = ModelArtifact(path=str(_llama7b_dir()), sha="llama7b-random-seed0", source_uri="random", kind="local")
    qspec = _llama7b_quant_spec()
    quant = quantize_model(model=base, spec=qspec)
    _write(Path(args.out), "llama2-7b-shape-quantize", {
        "gpu": _gpu(), "model": "Llama-2-7B shape, random weights", "command": " ".join(sys.argv),
        "quantize_s": quant.quantize_s, "reused": quant.model.reused, "quant_spec": qspec.model_dump(mode="json"),
        "path": quant.model.path})


def stage_llama7b_bench(args) -> None:
    from modelfactory.core import workdir
    from modelfactory.core.hashing import step_key
    from modelfactory.core.specs import BenchmarkSpec

    key = step_key("quantize", model="llama7b-random-seed0", spec=_llama7b_quant_spec())
    gptq_path = workdir.completed("quantize", key)
    assert gptq_path, "run llama7b-quantize first"
    quant_info = workdir.read_marker(gptq_path)
    bandwidth = copy_bandwidth_gbs()
    fp16 = None
    for kernel in args.kernels.split(","):
        spec = BenchmarkSpec(kernel=kernel, perplexity={"context_len": 2048, "stride": 2048, "max_tokens": 4096},
                             decode={"new_tokens": 256, "warmup": 1, "repeats": 3}).model_dump(mode="json")
        log = _home() / "logs" / f"llama7b-{kernel}.log"
        if fp16 is None:  # the fp16 side does not depend on the kernel: measure it once per machine
            cached = _home() / "llama7b-fp16-side.json"
            fp16 = json.loads(cached.read_text()) if cached.is_file() else _side(str(_llama7b_dir()), "fp16", spec, log)
            cached.write_text(json.dumps(fp16))
        try:
            gptq = _side(str(gptq_path), "gptq", spec, log)
        except Exception as exc:  # a kernel that does not load/capture here is reported, not fatal
            _write(Path(args.out), f"llama2-7b-shape-gptq-4bit-128g-{kernel}", {
                "gpu": _gpu(), "kernel": kernel, "command": " ".join(sys.argv), "error": str(exc)[:2000]})
            continue
        summary = _summary(fp16, gptq, model="Llama-2-7B shape, random weights", quantize_s=quant_info["quantize_s"],
                           requested_kernel=kernel, copy_bandwidth_gb_s=bandwidth)
        for side, m in (("fp16", fp16), ("gptq", gptq)):  # roofline: weight bytes read per token
            roofline = bandwidth * 1e9 / m["disk_bytes"]
            summary[side]["roofline_tok_s"] = roofline
            summary[side]["roofline_fraction"] = m["decode_tok_s"] / roofline
        _write(Path(args.out), f"llama2-7b-shape-gptq-4bit-128g-{kernel}", summary)


def _profile_side(model_path: str, side: str, kernel: str, steps: int, treatment: str = "graph") -> dict:
    """Device time per decode step, by kernel, over *steps* CUDA-graph replays (torch.profiler/CUPTI)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from modelfactory import benchmark as bench
    from modelfactory.core.specs import BenchmarkSpec
    from modelfactory.benchmark.fusion import fuse_projections
    from modelfactory.benchmark.sides import load_side

    spec = BenchmarkSpec(kernel=kernel)
    model, _ = load_side(model_path, side=side, spec=spec, device="cuda", dtype=torch.float16)
    ids = AutoTokenizer.from_pretrained(model_path)(spec.decode.prompt, return_tensors="pt")["input_ids"].cuda()
    opts = bench.GRAPH_TREATMENTS[treatment]
    if opts.fuse:
        fuse_projections(model, marlin_atomics=opts.marlin_atomics)
    decoder = bench.GraphDecoder(model, input_ids=ids, max_new_tokens=steps + 8, compile=opts.compile)
    decoder.generate(steps)
    with torch.inference_mode():
        decoder.prefill()
    torch.cuda.synchronize()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.graph.replay()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            rows.append({"kernel": event.key[:160], "calls_per_step": event.count / steps,
                         "us_per_step": device_us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    del model, decoder
    torch.cuda.empty_cache()
    return {"side": side, "kernel": kernel, "treatment": treatment, "device_us_per_step": total,
            "kernel_launches_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:40]}


def stage_llama7b_profile(args) -> None:
    from modelfactory.core import workdir
    from modelfactory.core.devices import gpu_env

    os.environ.update(gpu_env())  # in-process load: use the factory's Marlin JIT cache
    from modelfactory.core.hashing import step_key

    gptq_path = workdir.completed("quantize", step_key("quantize", model="llama7b-random-seed0",
                                                      spec=_llama7b_quant_spec()))
    result = {"gpu": _gpu(), "command": " ".join(sys.argv), "model": "Llama-2-7B shape, random weights",
              "fp16": _profile_side(str(_llama7b_dir()), "fp16", "auto", 64, args.treatment),
              "gptq": _profile_side(str(gptq_path), "gptq", "gptq_marlin", 64, args.treatment)}
    suffix = "" if args.treatment == "graph" else "-" + args.treatment.replace("_", "-")
    _write(Path(args.out), "llama2-7b-shape-decode-profile" + suffix, result)
    for side in ("fp16", "gptq"):
        print(side, round(result[side]["device_us_per_step"]), "us/step")
        for row in result[side]["top"][:8]:
            print(f"   {row['us_per_step']:8.1f} us  x{row['calls_per_step']:.0f}  {row['kernel'][:90]}")


# --------------------------------------------------------------------------- decode-step treatments (issue 7)
def stage_marlin_prewarm(args) -> None:
    """JIT-compile GPTQModel's Marlin fp16 extension into the factory's cache (CPU work: run it
    in the background while the quantize stage uses the GPU)."""
    from modelfactory.core.devices import gpu_env

    os.environ.update(gpu_env())
    import torch
    from gptqmodel.utils.marlin import prewarm_marlin_extension

    start = time.perf_counter()
    ok = prewarm_marlin_extension(torch.float16)
    print(f"marlin prewarm: {ok} in {time.perf_counter() - start:.0f} s", flush=True)


def _gptq_path() -> Path:
    from modelfactory.core import workdir
    from modelfactory.core.hashing import step_key

    path = workdir.completed("quantize", step_key("quantize", model="llama7b-random-seed0", spec=_llama7b_quant_spec()))
    assert path, "run llama7b-quantize first"
    return path


def stage_llama7b_treatments(args) -> None:
    """Every decode-step treatment of ``modelfactory.benchmark.GRAPH_TREATMENTS`` on one side per worker
    process (``bench/treatments.py``), each checked against the eager model."""
    from modelfactory import benchmark as bench
    from modelfactory.core import workdir
    from modelfactory.core.devices import gpu_env
    from modelfactory.core.isolation import run_isolated
    from modelfactory.core.specs import BenchmarkSpec

    from bench.treatments import measure_treatments

    gptq_path = _gptq_path()
    spec = BenchmarkSpec(kernel=args.kernel, decode={"new_tokens": 256, "warmup": 1, "repeats": 3}).model_dump(mode="json")
    bandwidth = copy_bandwidth_gbs()
    for side in args.sides.split(","):
        path = str(_llama7b_dir()) if side == "fp16" else str(gptq_path)
        log = _home() / "logs" / f"llama7b-treatments-{side}.log"
        result = run_isolated(measure_treatments,
                              kwargs={"model_path": path, "side": side, "spec": spec,
                                      "treatments": args.treatments.split(",")}, log_path=log, env=gpu_env())
        result.update(gpu=_gpu(), command=" ".join(sys.argv), copy_bandwidth_gb_s=bandwidth,
                      disk_bytes=bench.disk_bytes(Path(path)), requested_kernel=args.kernel if side == "gptq" else None,
                      quantize_s=workdir.read_marker(gptq_path)["quantize_s"])
        _write(Path(args.out), f"treatments-{side}{args.tag}", result)
        for name, row in result["treatments"].items():
            print(f"  {side:5s} {name:22s} " + (f"{row['decode_tok_s']:7.1f} tok/s  check {row['check']}"
                                               if "decode_tok_s" in row else row.get("error", "")[:300]), flush=True)


def stage_treatments_summary(args) -> None:
    """Combine ``treatments-fp16*.json`` and ``treatments-gptq*.json`` (``--inputs``) into one
    result file per treatment (same treatment on both sides) under ``--out``."""
    fp16 = json.loads(Path(args.inputs.split(",")[0]).read_text())
    gptq = json.loads(Path(args.inputs.split(",")[1]).read_text())
    for name in gptq["treatments"]:
        f_row, g_row = fp16["treatments"].get(name, {}), gptq["treatments"][name]
        if "decode_tok_s" not in f_row or "decode_tok_s" not in g_row:
            continue
        out = {"gpu": gptq["gpu"], "model": "Llama-2-7B shape, random weights", "decode_step": name,
               "command": {"fp16": fp16["command"], "gptq": gptq["command"], "summary": " ".join(sys.argv)},
               "quantize_s": gptq["quantize_s"], "copy_bandwidth_gb_s": gptq["copy_bandwidth_gb_s"],
               "new_tokens": 256, "batch": 1}
        for side, data, row in (("fp16", fp16, f_row), ("gptq", gptq, g_row)):
            roofline = data["copy_bandwidth_gb_s"] * 1e9 / data["disk_bytes"]
            out[side] = {"decode_tok_s": row["decode_tok_s"], "ttft_ms": row["ttft_ms"],
                         "vram_after_load_gib": data["mem_after_load_bytes"] / GIB,
                         "vram_peak_gib": row["mem_peak_decode_bytes"] / GIB, "disk_gb": data["disk_bytes"] / 1e9,
                         "kernel": data["kernel"], "load_s": data["load_s"], "compile_s": row["compile_s"],
                         "check_vs_eager": row["check"], "check_passed": row["check_passed"],
                         "roofline_tok_s": roofline, "roofline_fraction": row["decode_tok_s"] / roofline,
                         "sample_text": row["sample_text"]}
        out["decode_speedup"] = g_row["decode_tok_s"] / f_row["decode_tok_s"]
        out["vram_ratio"] = gptq["mem_after_load_bytes"] / fp16["mem_after_load_bytes"]
        out["roofline_fraction"] = out["gptq"]["roofline_fraction"]
        _write(Path(args.out), f"llama2-7b-shape-gptq-4bit-128g-marlin-{name.replace('_', '-')}{args.tag}", out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["smoke", "bandwidth", "smollm2", "llama7b-make", "llama7b-quantize", "llama7b-bench",
                                          "llama7b-profile", "marlin-prewarm", "llama7b-treatments",
                                          "treatments-summary"])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    parser.add_argument("--gguf")
    parser.add_argument("--tokenizer", default="/root/keep/tok32k")
    parser.add_argument("--kernels", default="auto,gptq_marlin,gptq_triton,gptq_torch")
    parser.add_argument("--kernel", default="gptq_marlin")
    parser.add_argument("--sides", default="fp16,gptq")
    parser.add_argument("--treatments", default="graph,compiled_graph,fused_graph,fused_compiled_graph")
    parser.add_argument("--tag", default="")
    parser.add_argument("--treatment", default="graph", help="llama7b-profile: decode-step treatment")
    parser.add_argument("--inputs", help="treatments-summary: FP16_JSON,GPTQ_JSON")
    args = parser.parse_args()
    globals()["stage_" + args.stage.replace("-", "_")](args)


if __name__ == "__main__":
    main()
