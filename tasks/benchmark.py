"""Step 4 — benchmark: the GPTQ model against its own fp16 baseline, with one harness.

Each side is measured in its own fresh worker process (see :mod:`modelfactory.benchmark.harness` for the
method), one after the other, so memory numbers are not polluted by the other side.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from prefect import task

from modelfactory import stage_store
from modelfactory.benchmark import harness as bench
from modelfactory.core import workdir
from modelfactory.core.devices import (
    apply_memory_cap,
    gpu_env,
    out_of_memory,
    resolve_device,
    resolve_dtype,
)
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.hashing import step_key
from modelfactory.core.isolation import run_isolated
from modelfactory.core.log import progress
from modelfactory.core.records import BenchmarkResult, ModelArtifact, SideMetrics
from modelfactory.core.specs import BenchmarkSpec
from modelfactory.sources.text import load_text


def _load(model_path: str, *, side: str, spec: BenchmarkSpec, device: str, dtype):
    """Load one side with plain transformers (GPTQ through its GPTQModel integration)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

    kwargs: dict = {"dtype": dtype, "device_map": device}
    kernel = "dense"
    if side == "gptq":
        config = AutoConfig.from_pretrained(model_path)
        qcfg = config.quantization_config
        widths = [config.hidden_size, getattr(config, "intermediate_size", config.hidden_size)]
        kernel = bench.choose_kernel(spec.kernel, device=device, group_size=qcfg["group_size"], in_features=widths)
        kwargs["quantization_config"] = GPTQConfig(bits=qcfg["bits"], backend=kernel)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.eval()
    return model, kernel


def measure_side(*, model_path: str, side: str, spec: dict, treatment: str | None = None) -> SideMetrics:
    """Worker body: :func:`_measure_side`, with CUDA out-of-memory turned into a clear, final error."""
    import torch

    try:
        return _measure_side(model_path=model_path, side=side, spec=spec, treatment=treatment)
    except torch.OutOfMemoryError as exc:
        device = resolve_device(BenchmarkSpec.model_validate(spec).device)
        raise out_of_memory(f"benchmark ({side})", model_path=model_path, device=device, exc=exc,
                            advice="lower benchmark.perplexity.context_len or decode.new_tokens, or run on a "
                                   "GPU with more free memory") from exc


def _measure_side(*, model_path: str, side: str, spec: dict, treatment: str | None = None) -> SideMetrics:
    """Worker body: load one model and measure it (runs in a fresh process).

    *treatment*: how the CUDA-graph decode step is prepared (a key of
    :data:`modelfactory.benchmark.harness.GRAPH_TREATMENTS`; default :data:`~modelfactory.benchmark.harness.DEFAULT_GRAPH_TREATMENT`).
    """
    import gptqmodel  # noqa: F401 - imported on both sides before the memory baseline, so its
    import torch  # footprint is not counted as model memory on one side only
    from transformers import AutoTokenizer

    bspec = BenchmarkSpec.model_validate(spec)
    device = resolve_device(bspec.device)
    apply_memory_cap(device)
    if device == "cpu":
        # Both sides run eagerly on CPU: GPTQModel's torch kernel would otherwise torch.compile its
        # dequantization per layer shape, which costs minutes on a small CPU and is not what we measure.
        torch._dynamo.config.disable = True
    dtype_name = resolve_dtype(bspec.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text, origin = load_text(bspec.perplexity.text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bspec.perplexity.max_tokens:
        ids = ids[: bspec.perplexity.max_tokens]
    prompt_ids = tokenizer(bspec.decode.prompt, return_tensors="pt")["input_ids"].to(device)

    probe = bench.MemoryProbe(device)
    start = time.perf_counter()
    model, requested_kernel = _load(model_path, side=side, spec=bspec, device=device, dtype=getattr(torch, dtype_name))
    load_s = time.perf_counter() - start
    mem_after_load = probe.current()
    kernel = bench.quantized_kernel_name(model) if side == "gptq" else "dense"
    progress(f"benchmark[{side}]: loaded in {load_s:.1f} s on {device}/{dtype_name}, kernel {kernel}"
             + (f" (requested {requested_kernel})" if side == "gptq" else ""))

    probe.reset_peak()
    dspec = bspec.decode
    decode_mode = bench.choose_decode_mode(dspec.mode, device=device)
    if decode_mode == "cuda_graph":
        model, ttft_s, tok_s, out, used, check = _graph_decode_checked(
            model, prompt_ids, dspec, treatment or dspec.graph_treatment,
            reload=lambda: _load(model_path, side=side, spec=bspec, device=device, dtype=getattr(torch, dtype_name))[0])
        decode_mode = f"cuda_graph:{used}"
        progress(f"benchmark[{side}]: {used} vs eager reference: max logits rel err "
                 f"{check['logits_max_rel_err']:.2e}, top-1 {check['teacher_forced_top1_agreement']:.2f}")
    else:
        ttft_s, tok_s, out = bench.measure_decode(model, prompt_ids, new_tokens=dspec.new_tokens,
                                                  warmup=dspec.warmup, repeats=dspec.repeats, device=device)
    mem_peak_decode = probe.peak()
    progress(f"benchmark[{side}]: decode ({decode_mode}) {tok_s:.1f} tok/s, ttft {ttft_s * 1000:.0f} ms")

    progress(f"benchmark[{side}]: perplexity over {len(ids)} tokens of {origin}")
    ppl = bench.measure_perplexity(model, ids, context_len=bspec.perplexity.context_len,
                                   stride=bspec.perplexity.stride, device=device)
    progress(f"benchmark[{side}]: perplexity {ppl:.3f}")
    return SideMetrics(
        side=side, device=device if device == "cpu" else torch.cuda.get_device_name(), dtype=dtype_name,
        kernel=kernel, disk_bytes=bench.disk_bytes(Path(model_path)), load_s=load_s, memory_kind=probe.kind,
        mem_after_load_bytes=mem_after_load, mem_peak_decode_bytes=mem_peak_decode,
        mem_peak_bytes=max(probe.peak(), mem_peak_decode), decode_tok_s=tok_s, ttft_ms=ttft_s * 1000,
        decode_mode=decode_mode,
        perplexity=ppl, ppl_tokens=len(ids), ppl_tokens_sha256=bench.token_digest(ids),
        sample_text=tokenizer.decode(out[0], skip_special_tokens=True),
    )


#: Greedy steps of the eager reference each decode-step treatment is checked against.
CHECK_STEPS = 32


def _graph_decode_checked(model, prompt_ids, dspec, treatment: str, *, reload):
    """CUDA-graph decode with *treatment*, checked against the eager reference first.

    A treatment whose logits drift from the eager model's (:func:`modelfactory.benchmark.harness.check_passes`)
    is not timed: the model is reloaded and the plain graph is used instead. Returns
    ``(model, ttft_s, tok_s, output_ids, treatment_used, check)``.
    """
    opts = bench.GRAPH_TREATMENTS[treatment]
    ref = bench.reference_decode(model, prompt_ids, steps=CHECK_STEPS)
    if opts["fuse"]:
        bench.fuse_projections(model, marlin_atomics=opts.get("marlin_atomics", False))
    decoder = bench.GraphDecoder(model, prompt_ids, max_new_tokens=dspec.new_tokens, compile=opts["compile"])
    check = decoder.check(*ref)
    if not bench.check_passes(check) and treatment != "graph":
        progress(f"benchmark: {treatment} failed its check against the eager model ({check}): plain graph instead")
        del decoder, model
        model = reload()
        treatment = "graph"
        decoder = bench.GraphDecoder(model, prompt_ids, max_new_tokens=dspec.new_tokens)
        check = decoder.check(*ref)
    if not bench.check_passes(check):
        raise BenchmarkError(f"CUDA-graph decode disagrees with the eager model: {check}")
    ttft_s, tok_s, out = bench.measure_decode_graph(model, prompt_ids, new_tokens=dspec.new_tokens,
                                                    warmup=dspec.warmup, repeats=dspec.repeats, decoder=decoder)
    return model, ttft_s, tok_s, out, treatment, check


def measure_treatments(*, model_path: str, side: str, spec: dict, treatments: list[str]) -> dict:
    """Worker body for the GPU benchmark script: one load, every decode-step treatment in order.

    Each treatment is checked against the same eager reference (taken before any fusion) and
    timed like :func:`measure_side`. Fusing treatments change the model in place, so list the
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
    probe = bench.MemoryProbe("cuda")
    start = time.perf_counter()
    model, _ = _load(model_path, side=side, spec=bspec, device="cuda", dtype=torch.float16)
    result = {"side": side, "load_s": time.perf_counter() - start, "mem_after_load_bytes": probe.current(),
              "kernel": bench.quantized_kernel_name(model) if side == "gptq" else "dense", "treatments": {}}
    ref_tokens, ref_logits = bench.reference_decode(model, prompt_ids, steps=CHECK_STEPS)
    result["reference_tokens"] = ref_tokens
    fused = False
    for name in treatments:
        opts = bench.GRAPH_TREATMENTS[name]
        row: dict = {}
        try:
            if opts["fuse"] and not fused:
                row["fused_modules"] = bench.fuse_projections(model, marlin_atomics=opts.get("marlin_atomics", False))
                fused = opts
            if fused and (not opts["fuse"] or fused.get("marlin_atomics") != opts.get("marlin_atomics")):
                raise ValueError("treatment needs another fusion than the model already has: run it in its own process")
            probe.reset_peak()
            decoder = bench.GraphDecoder(model, prompt_ids, max_new_tokens=dspec.new_tokens, compile=opts["compile"])
            row["compile_s"] = decoder.compile_s
            row["check"] = decoder.check(ref_tokens, ref_logits)
            row["check_passed"] = bench.check_passes(row["check"])
            ttft_s, tok_s, out = bench.measure_decode_graph(model, prompt_ids, new_tokens=dspec.new_tokens,
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


def _host_fingerprint() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "gpu": gpu, "torch": torch.__version__}


def benchmark_models(*, baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    """Measure *baseline* (fp16) and *candidate* (GPTQ) with the same harness and settings."""
    start = time.perf_counter()
    key = step_key("benchmark", fp16=baseline.sha, gptq=candidate.sha, spec=spec.model_dump(exclude={"reuse"}),
                   host=_host_fingerprint())
    done = stage_store.find("benchmark", key)
    if done is not None and spec.reuse:
        progress(f"benchmark: reusing {done.uri}")
        data = json.loads((done.folder() / "benchmark.json").read_text())
        return BenchmarkResult(**data, path=done.uri, reused=True, duration_s=time.perf_counter() - start)
    log_path = workdir.step_dir("benchmark", key).with_suffix(".log")
    sides = {}
    with workdir.building("benchmark", key) as (tmp, marker):
        for side, model in (("fp16", baseline), ("gptq", candidate)):
            progress(f"benchmark: measuring {side} side ({model.path})")
            sides[side] = SideMetrics.model_validate(run_isolated(
                "tasks.benchmark:measure_side",
                kwargs={"model_path": str(stage_store.resolve(model.path)), "side": side, "spec": spec.model_dump(mode="json")},
                log_path=log_path, env=gpu_env(), unexpected=BenchmarkError,
            ))
        (tmp / "benchmark.json").write_text(json.dumps({k: v.model_dump() for k, v in sides.items()}, indent=2))
        marker.update(fp16=baseline.sha, gptq=candidate.sha)
    if sides["fp16"].ppl_tokens_sha256 != sides["gptq"].ppl_tokens_sha256:
        raise BenchmarkError("fp16 and GPTQ sides scored different tokens (tokenizers differ?): "
                             "the quantized model must keep the baseline's tokenizer")
    done = stage_store.publish("benchmark", key)
    return BenchmarkResult(**sides, path=done.uri, duration_s=time.perf_counter() - start)


@task(name="benchmark")
def benchmark_task(baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    return benchmark_models(baseline=baseline, candidate=candidate, spec=spec)
