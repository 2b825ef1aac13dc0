"""Step 4 — benchmark: the GPTQ model against its own fp16 baseline, with one harness.

Two keyed steps, so that every quantized configuration of one merged model shares one fp16
measurement (a sweep measures the fp16 side once):

- :func:`benchmark_baseline` — the fp16 side, in ``<work_dir>/benchmark-fp16/<key>/``, keyed by
  the merged model, the settings that change the fp16 measurement
  (:meth:`~modelfactory.core.specs.BenchmarkSpec.baseline_inputs`: not the GPTQ kernel) and the host;
- :func:`benchmark_candidate` — the GPTQ side against a baseline, in ``<work_dir>/benchmark/<key>/``
  (``benchmark.json``: both sides, as before).

:func:`benchmark_models` is the two in a row (the plain factory flow). Each side is measured in its
own worker process (:func:`measure_side`; see :mod:`modelfactory.benchmark` for the method),
one after the other, so memory numbers are not polluted by the other side.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task

from modelfactory import benchmark as bench
from modelfactory import stage_store
from modelfactory.benchmark.agreement import (
    AgreementScorer,
    ReferenceWriter,
    read_reference_info,
)
from modelfactory.benchmark.task_eval import (
    TaskEvalResult,
    check_tasks_available,
    evaluate_tasks,
)
from modelfactory.core import workdir
from modelfactory.core.devices import (
    apply_memory_cap,
    gpu_env,
    out_of_memory_error,
    resolve_device,
    resolve_dtype,
    runs_on_cpu,
)
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.hashing import step_key
from modelfactory.core.isolation import run_isolated
from modelfactory.core.log import progress
from modelfactory.core.records import (
    AgreementMetrics,
    BaselineResult,
    BenchmarkResult,
    ModelArtifact,
    Side,
    SideMetrics,
    TaskMetrics,
)
from modelfactory.core.specs import (
    AgreementSpec,
    BenchmarkSpec,
    DecodeSpec,
    TaskEvalSpec,
)
from modelfactory.sources.text import load_text

SIDES: tuple[Side, ...] = ("fp16", "gptq")
#: The fp16 side's own step (its folder: ``<work_dir>/benchmark-fp16/<key>/``) and record file.
BASELINE_STEP = "benchmark-fp16"
BASELINE_FILE = "fp16.json"
#: The GPTQ side against a baseline: ``<work_dir>/benchmark/<key>/benchmark.json`` (both sides).
CANDIDATE_STEP = "benchmark"
#: The fp16 side's KL-divergence reference, a folder inside its step folder.
REFERENCE_DIR = "agreement-reference"
#: The GPTQ side's agreement statistics, written by its worker into the candidate's step folder.
AGREEMENT_FILE = "agreement.json"


def _load(model_path: str, *, side: Side, spec: BenchmarkSpec, device: str, dtype):
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


def measure_side(*, model_path: str, side: Side, spec: dict, treatment: bench.GraphTreatment | None = None,
                 out_dir: str | None = None, reference_dir: str | None = None) -> SideMetrics:
    """Worker body: :func:`_measure_side`, with CUDA out-of-memory turned into a clear, final error."""
    import torch

    try:
        return _measure_side(model_path=model_path, side=side, spec=spec, treatment=treatment, out_dir=out_dir,
                             reference_dir=reference_dir)
    except torch.OutOfMemoryError as exc:
        device = resolve_device(BenchmarkSpec.model_validate(spec).device)
        raise out_of_memory_error(f"benchmark ({side})", model_path=model_path, device=device, exc=exc,
                                  advice="lower benchmark.perplexity.context_len, decode.new_tokens or the largest of "
                                         "decode.batch_sizes, or run on a GPU with more free memory") from exc


class WindowOutputs:
    """Per-window outputs of one side's perplexity pass: the hook (:meth:`__call__`) and :meth:`finish`.

    fp16 side: the KL-divergence reference (top-k log-probs + residual mass per position,
    :class:`~modelfactory.benchmark.agreement.ReferenceWriter`) into its own step folder;
    GPTQ side: KL and top-1 agreement of its own distributions against that reference
    (:class:`~modelfactory.benchmark.agreement.AgreementScorer`).
    """

    def __init__(self, sink) -> None:
        self._sink = sink

    def __call__(self, index: int, window, logits, targets) -> None:
        self._sink.add(logits, targets)

    def finish(self) -> AgreementMetrics | None:
        """GPTQ side: the agreement statistics; fp16 side: ``None`` (the reference is written)."""
        result = self._sink.finish()
        return result if isinstance(result, AgreementMetrics) else None


def window_outputs(*, side: Side, out_dir: Path | None, reference_dir: Path | None,
                   agreement: AgreementSpec) -> WindowOutputs | None:
    """The hook for extra per-window outputs of a side's perplexity pass (``None``: nothing extra).

    It is called for every evaluation window with the window, the float32 logits at its scored
    positions and their target ids (:func:`modelfactory.benchmark.measure_perplexity`), so it sees
    exactly the tokens whose digest proves both sides scored the same text. *out_dir* is the side's
    own step folder under construction — for the fp16 side ``benchmark-fp16/<key>/``, committed and
    reused together with ``fp16.json`` by every configuration of the merged model — and
    *reference_dir* the committed fp16 folder (GPTQ side only). The fp16 side writes its
    KL-divergence reference (top-k log-probs per window) into ``out_dir/REFERENCE_DIR``, and the
    GPTQ side reads it back from ``reference_dir/REFERENCE_DIR`` to compare its own distribution
    with (KL, top-1 agreement).
    """
    if not agreement.enabled:
        return None
    if side == "fp16":
        if out_dir is None:
            raise BenchmarkError("the fp16 side needs its step folder to write the agreement reference into")
        return WindowOutputs(ReferenceWriter(out_dir / REFERENCE_DIR, top_k=agreement.top_k))
    if reference_dir is None:
        raise BenchmarkError("the GPTQ side needs the fp16 baseline's folder to score agreement against")
    return WindowOutputs(AgreementScorer(reference_dir / REFERENCE_DIR))


def _task_metrics(result: TaskEvalResult) -> dict[str, TaskMetrics]:
    return {s.task: TaskMetrics(acc=s.acc, acc_stderr=s.acc_stderr, acc_norm=s.acc_norm,
                                acc_norm_stderr=s.acc_norm_stderr, n_docs=s.n_docs) for s in result.scores}


def _measure_side(*, model_path: str, side: Side, spec: dict, treatment: bench.GraphTreatment | None = None,
                  out_dir: str | None = None, reference_dir: str | None = None) -> SideMetrics:
    """Worker body: load one model and measure it (runs in its own process).

    *treatment*: how the CUDA-graph decode step is prepared (a key of
    :data:`modelfactory.benchmark.GRAPH_TREATMENTS`; default: the spec's ``decode.graph_treatment``).
    *out_dir*: the side's step folder under construction, *reference_dir*: the fp16 side's folder
    (for :func:`window_outputs`).
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

    probe = bench.MemoryProbe(device=device)
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
        model, decoded, used, checks = _graph_decode_checked(
            model, prompt_ids=prompt_ids, dspec=dspec, treatment=treatment or dspec.graph_treatment, probe=probe,
            reload=lambda: _load(model_path, side=side, spec=bspec, device=device, dtype=getattr(torch, dtype_name))[0])
        recorded_mode = f"cuda_graph:{used}"
        for batch, check in checks.items():
            progress(f"benchmark[{side}]: {used} at batch {batch} vs eager reference: max logits rel err "
                     f"{check.logits_max_rel_err:.2e}, top-1 {check.teacher_forced_top1_agreement:.2f}")
    else:
        decoded = _eager_decode(model, prompt_ids=prompt_ids, dspec=dspec, device=device, probe=probe)
        recorded_mode = decode_mode
    tok_s = {batch: run.tok_s for batch, run in decoded.items()}
    first = decoded[1]  # batch 1: decode_tok_s, ttft, the sample text and the decode memory peak
    progress(f"benchmark[{side}]: decode ({recorded_mode}) "
             + ", ".join(f"batch {batch}: {rate:.1f} tok/s" for batch, rate in tok_s.items())
             + f"; ttft {first.ttft_s * 1000:.0f} ms")

    progress(f"benchmark[{side}]: perplexity over {len(ids)} tokens of {origin}")
    outputs = window_outputs(side=side, out_dir=_path(out_dir), reference_dir=_path(reference_dir),
                             agreement=bspec.agreement)
    ppl = bench.measure_perplexity(model, ids=ids, context_len=bspec.perplexity.context_len,
                                   stride=bspec.perplexity.stride, device=device, on_window=outputs)
    progress(f"benchmark[{side}]: perplexity {ppl:.3f}")
    if outputs is not None and (stats := outputs.finish()) is not None:
        # The worker returns one record; the agreement travels next to it in the step folder under construction.
        (Path(out_dir) / AGREEMENT_FILE).write_text(stats.model_dump_json(indent=2))
        progress(f"benchmark[{side}]: KL(fp16||gptq) mean {stats.kld_mean:.4g}, p99 {stats.kld_p99:.4g} nats "
                 f"(top-{stats.top_k}), top-1 agreement {stats.top1_agreement_pct:.2f} %")
    task_fields: dict = {}
    if bspec.tasks.names:
        # The loaded model as it is (the GPTQ side with the benchmark's kernel selection) through lm-eval's HF wrapper.
        progress(f"benchmark[{side}]: lm-eval {', '.join(bspec.tasks.names)} (limit {bspec.tasks.limit})")
        evaluated = evaluate_tasks(model=model, tokenizer=tokenizer, tasks=bspec.tasks.names,
                                   limit=bspec.tasks.limit, batch_size=bspec.tasks.batch_size)
        task_fields = {"tasks": _task_metrics(evaluated), "tasks_lm_eval_version": evaluated.lm_eval_version,
                       "tasks_limit": evaluated.limit}
        progress(f"benchmark[{side}]: " + "; ".join(
            f"{t}: acc {m.acc}, acc_norm {m.acc_norm} ({m.n_docs} docs)" for t, m in task_fields["tasks"].items()))
    return SideMetrics(**task_fields,
        side=side, device=device if device == "cpu" else torch.cuda.get_device_name(), dtype=dtype_name,
        kernel=kernel, disk_bytes=bench.disk_bytes(Path(model_path)), load_s=load_s, memory_kind=probe.kind,
        mem_after_load_bytes=mem_after_load, mem_peak_decode_bytes=first.mem_peak_bytes,
        mem_peak_bytes=max(probe.peak(), first.mem_peak_bytes), decode_tok_s=first.tok_s, ttft_ms=first.ttft_s * 1000,
        decode_mode=recorded_mode, decode_tok_s_by_batch=tok_s,
        perplexity=ppl, ppl_tokens=len(ids), ppl_tokens_sha256=bench.token_digest(ids),
        sample_text=tokenizer.decode(first.output_ids[0], skip_special_tokens=True),
    )


def _path(folder: str | None) -> Path | None:
    return None if folder is None else Path(folder)


@dataclass(frozen=True, slots=True)
class _Decoded:
    """One batch size's timed decode."""

    ttft_s: float
    tok_s: float  # all sequences' tokens
    output_ids: object  # (B, prompt + new tokens)
    mem_peak_bytes: int  # the probe's peak since the decode phase began, read right after this batch


def _eager_decode(model, *, prompt_ids, dspec: DecodeSpec, device: str, probe: bench.MemoryProbe,
                  ) -> dict[int, _Decoded]:
    """HF ``generate`` at every batch size (ascending, from 1) of *dspec*."""
    decoded = {}
    for batch in dspec.batch_sizes:
        ttft_s, tok_s, out = bench.measure_decode(model, input_ids=bench.batch_prompt(prompt_ids, batch),
                                                  new_tokens=dspec.new_tokens, warmup=dspec.warmup,
                                                  repeats=dspec.repeats, device=device)
        decoded[batch] = _Decoded(ttft_s=ttft_s, tok_s=tok_s, output_ids=out, mem_peak_bytes=probe.peak())
    return decoded


#: Greedy steps of the eager reference each decode-step treatment is checked against.
CHECK_STEPS = 32


def _graph_decode_checked(model, *, prompt_ids, dspec: DecodeSpec, treatment: bench.GraphTreatment,
                          probe: bench.MemoryProbe, reload: Callable[[], object]):
    """CUDA-graph decode with *treatment* at every batch size of *dspec*, each checked against the
    batch-1 eager reference first.

    A treatment whose logits drift from the eager model's at any batch size
    (:attr:`modelfactory.benchmark.DecodeCheck.passed`) is not used: the model is reloaded and every
    batch size is measured again with the plain graph, so all of a side's rates come from one
    treatment. Returns ``(model, {batch: _Decoded}, treatment_used, {batch: DecodeCheck})``.
    """
    import torch

    ref_tokens, ref_logits = bench.reference_decode(model, input_ids=prompt_ids, steps=CHECK_STEPS)
    while True:
        opts = bench.GRAPH_TREATMENTS[treatment]
        if opts.fuse:  # in place, once: every batch size's decoder runs on the fused model
            bench.fuse_projections(model, marlin_atomics=opts.marlin_atomics)
        decoded, checks = {}, {}
        for batch in dspec.batch_sizes:
            decoder = bench.GraphDecoder(model, input_ids=bench.batch_prompt(prompt_ids, batch),
                                         max_new_tokens=dspec.new_tokens, compile=opts.compile)
            check = checks[batch] = decoder.check(ref_tokens=ref_tokens, ref_logits=ref_logits)
            if not check.passed:
                break
            ttft_s, tok_s, out = bench.measure_decode_graph(model, input_ids=decoder.input_ids,
                                                            new_tokens=dspec.new_tokens, warmup=dspec.warmup,
                                                            repeats=dspec.repeats, decoder=decoder)
            decoded[batch] = _Decoded(ttft_s=ttft_s, tok_s=tok_s, output_ids=out if batch == 1 else None,
                                      mem_peak_bytes=probe.peak())
            del decoder, out  # its static cache and graph pool before the next batch size's
            torch.cuda.empty_cache()
        else:
            return model, decoded, treatment, checks
        if treatment == "graph":
            raise BenchmarkError(f"CUDA-graph decode at batch {batch} disagrees with the eager model: "
                                 f"{asdict(check)}")
        progress(f"benchmark: {treatment} failed its check against the eager model at batch {batch} "
                 f"({asdict(check)}): plain graph instead")
        del decoder, model
        torch.cuda.empty_cache()
        model = reload()
        treatment = "graph"


def measure_treatments(*, model_path: str, side: Side, spec: dict, treatments: list[bench.GraphTreatment]) -> dict:
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
    probe = bench.MemoryProbe(device="cuda")
    start = time.perf_counter()
    model, _ = _load(model_path, side=side, spec=bspec, device="cuda", dtype=torch.float16)
    result = {"side": side, "load_s": time.perf_counter() - start, "mem_after_load_bytes": probe.current(),
              "kernel": bench.quantized_kernel_name(model) if side == "gptq" else "dense", "treatments": {}}
    ref_tokens, ref_logits = bench.reference_decode(model, input_ids=prompt_ids, steps=CHECK_STEPS)
    result["reference_tokens"] = ref_tokens
    fused: bench.Treatment | None = None  # the fusion the model has, once a fusing treatment ran
    for name in treatments:
        opts = bench.GRAPH_TREATMENTS[name]
        row: dict = {}
        try:
            if opts.fuse and fused is None:
                row["fused_modules"] = bench.fuse_projections(model, marlin_atomics=opts.marlin_atomics)
                fused = opts
            if fused is not None and (not opts.fuse or fused.marlin_atomics != opts.marlin_atomics):
                raise ValueError("treatment needs another fusion than the model already has: run it in its own process")
            probe.reset_peak()
            decoder = bench.GraphDecoder(model, input_ids=prompt_ids, max_new_tokens=dspec.new_tokens,
                                         compile=opts.compile)
            row["compile_s"] = decoder.compile_s
            check = decoder.check(ref_tokens=ref_tokens, ref_logits=ref_logits)
            row["check"] = asdict(check)
            row["check_passed"] = check.passed
            ttft_s, tok_s, out = bench.measure_decode_graph(model, input_ids=prompt_ids, new_tokens=dspec.new_tokens,
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


def _host_fingerprint(spec: BenchmarkSpec) -> dict:
    """What of this host the fp16 measurement depends on, the dtype it computes in included (on a CPU
    that depends on its bf16 instructions: :func:`~modelfactory.core.devices.resolve_dtype`)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    return {"machine": platform.machine(), "gpu": gpu, "torch": torch.__version__, "dtype": dtype}


def _side_record(data: object, *, side: Side) -> SideMetrics:
    metrics = SideMetrics.model_validate(data)
    if metrics.side != side:
        raise ValueError(f"the {side} record is of side {metrics.side!r}")
    return metrics


def _stored_baseline(folder: Path, *, spec: BenchmarkSpec) -> SideMetrics:
    """The fp16 side of a finished baseline step, validated (with its agreement reference when *spec*
    measures agreement); :class:`BenchmarkError` if unreadable."""
    try:
        metrics = _side_record(json.loads((folder / BASELINE_FILE).read_text()), side="fp16")
    except (OSError, ValueError, TypeError) as exc:  # JSON and pydantic errors are ValueErrors
        raise BenchmarkError(f"stored fp16 baseline {folder} is unreadable ({exc})") from exc
    if spec.agreement.enabled:  # finished and readable; the GPTQ side checks it scores the very same tokens
        read_reference_info(folder / REFERENCE_DIR)
    return metrics


def _agreement_record(folder: Path, *, spec: BenchmarkSpec) -> AgreementMetrics | None:
    """The GPTQ side's agreement statistics in *folder* (``None`` when *spec* does not measure them)."""
    if not spec.agreement.enabled:
        return None
    return AgreementMetrics.model_validate_json((folder / AGREEMENT_FILE).read_text())


def _stored_candidate(folder: Path, *, baseline: BaselineResult, spec: BenchmarkSpec,
                      ) -> tuple[SideMetrics, AgreementMetrics | None]:
    """The GPTQ side of a finished benchmark against *baseline*, validated as a fresh one is before
    it is committed.

    Raises :class:`BenchmarkError` when ``benchmark.json`` is unreadable, its records are invalid,
    its fp16 side is not *baseline*'s measurement (the baseline was measured again since), or its
    sides scored different tokens.
    """
    try:
        data = json.loads((folder / "benchmark.json").read_text())
        sides = {side: _side_record(data[side], side=side) for side in SIDES}
        agreement = _agreement_record(folder, spec=spec)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSON and pydantic errors are ValueErrors
        raise BenchmarkError(f"stored benchmark {folder} is unreadable ({exc})") from exc
    if sides["fp16"] != baseline.metrics:
        raise BenchmarkError(f"stored benchmark {folder} was combined with another fp16 measurement than "
                             f"the baseline in {baseline.path}")
    bench.check_same_tokens(**sides)
    return sides["gptq"], agreement


def _measure(model: ModelArtifact, *, side: Side, spec: BenchmarkSpec, log_path: Path, out_dir: Path,
             reference_dir: Path | None = None) -> SideMetrics:
    """One side in its own worker process (:func:`measure_side`); the model is fetched to this host first
    when it was built on another one (:func:`modelfactory.stage_store.resolve`)."""
    progress(f"benchmark: measuring {side} side ({model.path})")
    return _side_record(run_isolated(
        "modelfactory.tasks.benchmark:measure_side",
        kwargs={"model_path": str(stage_store.resolve(model.path)), "side": side,
                "spec": spec.model_dump(mode="json"), "out_dir": str(out_dir),
                "reference_dir": str(reference_dir) if reference_dir else None},
        # On CPU forked from a warm interpreter (core/forkserver): it starts with the memory a fresh one has.
        log_path=log_path, env=gpu_env(), unexpected=BenchmarkError, warm=runs_on_cpu(spec.device),
    ), side=side)


def baseline_key(*, model_sha: str, spec: BenchmarkSpec) -> str:
    """The fp16 side's step key: the merged model, the settings its measurement depends on
    (:meth:`~modelfactory.core.specs.BenchmarkSpec.baseline_inputs`) and this host."""
    return step_key(BASELINE_STEP, model=model_sha, spec=spec.baseline_inputs(), host=_host_fingerprint(spec))


def _reusable(step: str, key: str, spec: BenchmarkSpec) -> stage_store.StepOutput | None:
    """The finished output of *step* for *key* to try reusing (this host's work dir, else the stage
    store); with ``spec.reuse`` off, none, and a finished local one is discarded so the fresh
    measurement replaces it."""
    done = stage_store.find(step, key)
    if done is not None and not spec.reuse:
        workdir.discard(step, key)
        return None
    return done


def benchmark_baseline(*, model: ModelArtifact, spec: BenchmarkSpec) -> BaselineResult:
    """Measure the fp16 side of *model* once for every quantized configuration of it.

    Stored in ``benchmark-fp16/<key>/`` (:func:`baseline_key`) with the side's per-window outputs
    (:func:`window_outputs`), and in the stage store when one is set, so configurations measured on
    other hosts reuse it. A finished baseline is reused if its record is valid; one that is not is
    discarded and measured again.
    """
    start = time.perf_counter()
    key = baseline_key(model_sha=model.sha, spec=spec)
    if (done := _reusable(BASELINE_STEP, key, spec)) is not None:
        try:
            metrics = _stored_baseline(done.folder(), spec=spec)
        except BenchmarkError as exc:
            progress(f"benchmark: not reusing {done.uri}: {exc}; measuring again")
            workdir.discard(BASELINE_STEP, key)
        else:
            progress(f"benchmark: reusing the fp16 side {done.uri}")
            return BaselineResult(model_sha=model.sha, metrics=metrics, key=key, path=done.uri, reused=True,
                                  duration_s=time.perf_counter() - start)
    final = workdir.step_dir(BASELINE_STEP, key)
    with workdir.building(BASELINE_STEP, key) as (tmp, marker):
        metrics = _measure(model, side="fp16", spec=spec, log_path=final.with_suffix(".log"), out_dir=tmp)
        (tmp / BASELINE_FILE).write_text(metrics.model_dump_json(indent=2))
        marker.update(model=model.sha)
    done = stage_store.publish(BASELINE_STEP, key)
    # What is stored is the baseline (a concurrent identical measurement may have been committed first).
    return BaselineResult(model_sha=model.sha, metrics=_stored_baseline(final, spec=spec), key=key, path=done.uri,
                          duration_s=time.perf_counter() - start)


def benchmark_candidate(*, baseline: BaselineResult, candidate: ModelArtifact, spec: BenchmarkSpec,
                        ) -> BenchmarkResult:
    """Measure the GPTQ side of *candidate* and combine it with *baseline*, its merged model's fp16 side.

    *baseline* must come from :func:`benchmark_baseline` with the same fp16 settings on this kind of
    host (its key is checked). Both sides must have scored the same tokens before the result is
    committed, and a finished benchmark is reused only if it passes the same checks; one that fails
    them is discarded and the GPTQ side measured again.
    """
    start = time.perf_counter()
    expected = baseline_key(model_sha=baseline.model_sha, spec=spec)
    if baseline.key != expected:
        raise BenchmarkError(
            f"the fp16 baseline in {baseline.path} (key {baseline.key}) was measured with other benchmark settings "
            f"or on another kind of host than this benchmark's (key {expected}): measure the baseline with this "
            f"spec on this kind of host (benchmark_baseline) and pass that")
    key = step_key(CANDIDATE_STEP, baseline=baseline.key, gptq=candidate.sha, spec=spec.candidate_inputs())
    shared = {"fp16": baseline.metrics, "baseline_path": baseline.path, "baseline_reused": baseline.reused}
    if (done := _reusable(CANDIDATE_STEP, key, spec)) is not None:
        try:
            gptq, agreement = _stored_candidate(done.folder(), baseline=baseline, spec=spec)
        except BenchmarkError as exc:
            progress(f"benchmark: not reusing {done.uri}: {exc}; measuring again")
            workdir.discard(CANDIDATE_STEP, key)
        else:
            progress(f"benchmark: reusing {done.uri}")
            return BenchmarkResult(**shared, gptq=gptq, agreement=agreement, path=done.uri, reused=True,
                                   duration_s=time.perf_counter() - start)
    final = workdir.step_dir(CANDIDATE_STEP, key)
    with workdir.building(CANDIDATE_STEP, key) as (tmp, marker):
        gptq = _measure(candidate, side="gptq", spec=spec, log_path=final.with_suffix(".log"), out_dir=tmp,
                        reference_dir=stage_store.resolve(baseline.path))
        bench.check_same_tokens(fp16=baseline.metrics, gptq=gptq)  # before the commit: never stored for reuse
        _agreement_record(tmp, spec=spec)  # the worker wrote it (checked before the commit)
        sides = {"fp16": baseline.metrics, "gptq": gptq}
        (tmp / "benchmark.json").write_text(json.dumps({k: v.model_dump(mode="json") for k, v in sides.items()},
                                                       indent=2))
        marker.update(fp16=baseline.model_sha, gptq=candidate.sha, baseline=baseline.key)
    done = stage_store.publish(CANDIDATE_STEP, key)
    # What is stored is the result (a concurrent identical measurement may have been committed first).
    gptq, agreement = _stored_candidate(final, baseline=baseline, spec=spec)
    return BenchmarkResult(**shared, gptq=gptq, agreement=agreement, path=done.uri,
                           duration_s=time.perf_counter() - start)


def benchmark_models(*, baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    """Measure *baseline* (fp16) and *candidate* (GPTQ) with the same harness and settings:
    :func:`benchmark_baseline` (reused when another configuration of the model measured it), then
    :func:`benchmark_candidate`."""
    start = time.perf_counter()
    fp16 = benchmark_baseline(model=baseline, spec=spec)
    result = benchmark_candidate(baseline=fp16, candidate=candidate, spec=spec)
    return result.model_copy(update={"duration_s": time.perf_counter() - start})


@task(name="benchmark")
def benchmark_task(baseline: ModelArtifact, candidate: ModelArtifact, spec: BenchmarkSpec) -> BenchmarkResult:
    return benchmark_models(baseline=baseline, candidate=candidate, spec=spec)


@task(name="benchmark-fp16")
def benchmark_baseline_task(model: ModelArtifact, spec: BenchmarkSpec) -> BaselineResult:
    return benchmark_baseline(model=model, spec=spec)


@task(name="benchmark-gptq")
def benchmark_candidate_task(baseline: BaselineResult, candidate: ModelArtifact, spec: BenchmarkSpec,
                             ) -> BenchmarkResult:
    return benchmark_candidate(baseline=baseline, candidate=candidate, spec=spec)


#: ``log_prints=False``: loading a task's data makes ``datasets`` pickle functions with dill, whose
#: global-variable scan disassembles them with ``dis.dis`` into a redirected ``sys.stdout``. The flows'
#: ``log_prints`` would take those prints for the step's own and log a page of bytecode per run.
@task(name="check-tasks", log_prints=False)
def check_tasks_task(spec: TaskEvalSpec) -> None:
    """Before any heavy work: every lm-eval task of *spec* is known and its data is on this machine
    (:func:`~modelfactory.benchmark.task_eval.check_tasks_available`); nothing to check without tasks."""
    if spec.names:
        check_tasks_available(spec.names)
