"""Step 4 — benchmark: the GPTQ model against its own fp16 baseline, with one harness.

Each side is measured in its own fresh worker process (see :mod:`modelfactory.bench` for the
method), one after the other, so memory numbers are not polluted by the other side.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from prefect import task

from modelfactory import bench, workdir
from modelfactory.devices import gpu_env, resolve_device, resolve_dtype
from modelfactory.errors import BenchmarkError
from modelfactory.hashing import step_key
from modelfactory.isolation import run_isolated
from modelfactory.log import progress
from modelfactory.records import BenchmarkResult, ModelArtifact, SideMetrics
from modelfactory.specs import BenchmarkSpec
from modelfactory.textdata import load_text


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


def measure_side(*, model_path: str, side: str, spec: dict) -> SideMetrics:
    """Worker body: load one model and measure it (runs in a fresh process)."""
    import gptqmodel  # noqa: F401 - imported on both sides before the memory baseline, so its
    import torch       # footprint is not counted as model memory on one side only
    from transformers import AutoTokenizer

    bspec = BenchmarkSpec.model_validate(spec)
    device = resolve_device(bspec.device)
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
        ttft_s, tok_s, out = bench.measure_decode_graph(model, prompt_ids, new_tokens=dspec.new_tokens,
                                                        warmup=dspec.warmup, repeats=dspec.repeats)
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


def _host_fingerprint() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "gpu": gpu, "torch": torch.__version__}


def benchmark_models(*, baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    """Measure *baseline* (fp16) and *candidate* (GPTQ) with the same harness and settings."""
    start = time.perf_counter()
    key = step_key("benchmark", fp16=baseline.sha, gptq=candidate.sha, spec=spec.model_dump(exclude={"reuse"}),
                   host=_host_fingerprint())
    done = workdir.completed("benchmark", key)
    if done is not None and spec.reuse:
        progress(f"benchmark: reusing {done}")
        data = json.loads((done / "benchmark.json").read_text())
        return BenchmarkResult(**data, path=str(done), reused=True, duration_s=time.perf_counter() - start)
    log_path = workdir.step_dir("benchmark", key).with_suffix(".log")
    sides = {}
    with workdir.building("benchmark", key) as (tmp, marker):
        for side, model in (("fp16", baseline), ("gptq", candidate)):
            progress(f"benchmark: measuring {side} side ({model.path})")
            sides[side] = SideMetrics.model_validate(run_isolated(
                "tasks.benchmark:measure_side",
                kwargs={"model_path": model.path, "side": side, "spec": spec.model_dump(mode="json")},
                log_path=log_path, env=gpu_env(), unexpected=BenchmarkError,
            ))
        (tmp / "benchmark.json").write_text(json.dumps({k: v.model_dump() for k, v in sides.items()}, indent=2))
        marker.update(fp16=baseline.sha, gptq=candidate.sha)
    done = workdir.step_dir("benchmark", key)
    if sides["fp16"].ppl_tokens_sha256 != sides["gptq"].ppl_tokens_sha256:
        raise BenchmarkError("fp16 and GPTQ sides scored different tokens (tokenizers differ?): "
                             "the quantized model must keep the baseline's tokenizer")
    return BenchmarkResult(**sides, path=str(done), duration_s=time.perf_counter() - start)


@task(name="benchmark")
def benchmark_task(baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    return benchmark_models(baseline=baseline, candidate=candidate, spec=spec)
