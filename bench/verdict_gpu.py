"""The verdict's checks on a real model, GPU or CPU: fp16 vs GPTQ side by side, one JSON per config.

For each group size: the factory's own quantize step (``modelfactory.tasks.quantize.quantize_model``) and benchmark
step (``modelfactory.tasks.benchmark.benchmark_models``: perplexity, memory, decode at every batch size, each side in
its own process), then, in one process per side with the benchmark's own loader (same kernel choice):
KL divergence / top-1 agreement against the fp16 side's stored top-k (``modelfactory.benchmark.agreement``,
the perplexity windows), lm-eval task accuracy (``modelfactory.benchmark.task_eval``), and the plain
``transformers`` runnability check (``modelfactory.benchmark.runnability``) on every device present.

  python3 bench/verdict_gpu.py --model smollm2 --gguf /root/keep/smollm2.gguf --groups auto,128 \
      --tasks piqa_local --out $OUT
  python3 bench/verdict_gpu.py --model llama7b --groups 128 --out $OUT       # random weights: no tasks

Prints one JSON line per config and writes ``<model>-<label>-verdict.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def base_model(args) -> "object":
    """The fp16 model as a ModelArtifact (GGUF dequantized by the download step, or a random 7B shape)."""
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import ModelSource
    from modelfactory.tasks.download import download_model

    if args.model == "smollm2":
        return download_model(source=ModelSource(uri=args.gguf))
    if args.model == "local":  # any local fp16 folder (e.g. a tiny model for a smoke run)
        return download_model(source=ModelSource(uri=args.model_dir))
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(os.environ.get("MODELFACTORY_HOME", "/root/mfhome")) / "llama7b-fp16"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA7B, torch_dtype="float16")).to(torch.float16)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(out)
        del model
    from modelfactory.core.hashing import tree_sha256

    return ModelArtifact(path=str(out), sha=tree_sha256(out), source_uri="random llama-2-7b shape", kind="local")


def side_checks(*, model_path: str, side: str, spec_json: dict, reference_dir: str, tasks: list[str],
                limit: int | None) -> dict:
    """One side in its own process: the agreement reference (fp16) or score (gptq), and the task scores."""
    import torch

    from modelfactory.benchmark import agreement, task_eval
    from modelfactory.core.devices import resolve_device, resolve_dtype
    from modelfactory.core.specs import BenchmarkSpec
    from modelfactory.sources.text import load_text
    from modelfactory.benchmark.sides import load_side

    spec = BenchmarkSpec.model_validate(spec_json)
    device = resolve_device(spec.device)
    dtype = getattr(torch, resolve_dtype(spec.dtype, device))
    model, kernel = load_side(model_path, side=side, spec=spec, device=device, dtype=dtype)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text, _ = load_text(spec.perplexity.text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: spec.perplexity.max_tokens]
    windows = agreement.scored_logits(model, ids, context_len=spec.perplexity.context_len,
                                      stride=spec.perplexity.stride, device=device)
    out: dict = {"kernel": kernel}
    started = time.perf_counter()
    if side == "fp16":
        info = agreement.write_reference(Path(reference_dir), windows)
        out["reference"] = {"positions": info.positions, "top_k": info.top_k}
    else:
        stats = agreement.score_agreement(Path(reference_dir), windows)
        out["agreement"] = stats.model_dump(mode="json")
    out["agreement_s"] = time.perf_counter() - started
    if tasks:
        result = task_eval.evaluate_tasks(model=model, tokenizer=tokenizer, tasks=tasks, limit=limit,
                                          batch_size=32 if device == "cuda" else 8, device=device)
        out["tasks"] = result.model_dump(mode="json")
    return out


def run_config(args, base, group: str) -> dict:
    from modelfactory.benchmark.runnability import check_runs_plainly
    from modelfactory.core.isolation import run_isolated
    from modelfactory.core.specs import BenchmarkSpec, QuantSpec
    from modelfactory.core.devices import gpu_env
    from modelfactory.tasks.benchmark import benchmark_models
    from modelfactory.tasks.quantize import quantize_model

    qspec = QuantSpec.model_validate({"bits": 4, "group_size": group if group == "auto" else int(group),
                                      "damp_percent": args.damp if args.damp is not None
                                      else (0.1 if args.model == "smollm2" else 0.05),
                                      "calibration": {"num_samples": args.cal_samples, "seq_len": args.cal_len}})
    started = time.perf_counter()
    quant = quantize_model(model=base, spec=qspec)
    label = quant.spec_label(qspec)
    print(f"[verdict] {label}: quantized in {quant.quantize_s:.0f} s", flush=True)
    bspec = BenchmarkSpec.model_validate({"perplexity": {"max_tokens": args.ppl_tokens},
                                          "decode": {"batch_sizes": [1, 8, 32], "new_tokens": args.new_tokens}})
    bench = benchmark_models(baseline=base, candidate=quant.model, spec=bspec)
    print(f"[verdict] {label}: benchmark in {bench.duration_s:.0f} s", flush=True)
    ref = Path(os.environ.get("MODELFACTORY_HOME", "/root/mfhome")) / f"kld-ref-{args.model}"
    log = Path(os.environ.get("MODELFACTORY_HOME", "/root/mfhome")) / "verdict.log"
    tasks = [t for t in args.tasks.split(",") if t]
    checks = {}
    for side, path in (("fp16", base.path), ("gptq", quant.model.path)):
        if side == "fp16" and (ref / "reference.json").is_file() and "fp16" in CACHE:
            checks[side] = CACHE["fp16"]
            continue
        t0 = time.perf_counter()
        # by its importable name (this file runs as __main__): the step process imports bench.verdict_gpu
        from bench.verdict_gpu import side_checks as worker

        checks[side] = run_isolated(worker, kwargs={
            "model_path": path, "side": side, "spec_json": bspec.model_dump(mode="json"), "reference_dir": str(ref),
            "tasks": tasks, "limit": args.limit}, log_path=log, env=gpu_env())
        checks[side]["wall_s"] = time.perf_counter() - t0
        if side == "fp16":
            CACHE["fp16"] = checks[side]
        print(f"[verdict] {label}: {side} checks in {checks[side]['wall_s']:.0f} s", flush=True)
    t0 = time.perf_counter()
    runnable = check_runs_plainly(model_dir=quant.model.path, devices="auto", timeout_s=args.runnable_timeout)
    runnable_s = time.perf_counter() - t0
    recovery = {}
    for task in tasks:
        a, b = (next(x for x in checks[s]["tasks"]["scores"] if x["task"] == task) for s in ("fp16", "gptq"))
        recovery[task] = {m: (b[m] / a[m] * 100 if a.get(m) else None) for m in ("acc", "acc_norm")}
    result = {
        "gpu": _device_name(), "model": args.model, "config": label, "group_size": quant.group_size,
        "command": " ".join(["python3", *sys.argv]), "host": platform.node(),
        "ratios": bench.ratios(), "fp16": bench.fp16.model_dump(mode="json"), "gptq": bench.gptq.model_dump(mode="json"),
        "agreement": checks["gptq"].get("agreement"), "tasks": {s: checks[s].get("tasks") for s in checks},
        "task_recovery_pct": recovery, "runnability": runnable.model_dump(mode="json"),
        "timings_s": {"quantize": quant.quantize_s, "benchmark": bench.duration_s, "runnability": runnable_s,
                      "fp16_checks": checks["fp16"].get("wall_s"), "gptq_checks": checks["gptq"].get("wall_s"),
                      "config_total": time.perf_counter() - started},
    }
    return result


CACHE: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "llama7b", "local"], required=True)
    parser.add_argument("--model-dir")
    parser.add_argument("--gguf")
    parser.add_argument("--tokenizer", default="/root/keep/tok32k")
    parser.add_argument("--groups", default="auto,128")
    parser.add_argument("--tasks", default="")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cal-samples", type=int, default=48)
    parser.add_argument("--cal-len", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--damp", type=float, default=None, help="GPTQ dampening (default 0.1 for smollm2, "
                        "else 0.05; the demo's spec uses 0.05)")
    parser.add_argument("--runnable-timeout", type=float, default=600)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    base = base_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for group in args.groups.split(","):
        try:
            result = run_config(args, base, group)
        except Exception as exc:  # noqa: BLE001 - one config failing must not lose the others' numbers
            print(f"[verdict] group {group} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        where = "gpu" if result["gpu"] and not result["gpu"].startswith("cpu") else "cpu"
        (out / f"{args.model}-{result['config']}-verdict-{where}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("gpu", "model", "config", "ratios", "agreement",
                                                  "task_recovery_pct", "timings_s")}, default=str), flush=True)


if __name__ == "__main__":
    main()
