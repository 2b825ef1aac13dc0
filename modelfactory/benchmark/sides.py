"""One side of the benchmark (fp16 baseline or GPTQ candidate), measured in a process of its own.

:func:`measure_side` is the body of that process (``modelfactory.tasks.benchmark`` starts it with
:func:`modelfactory.core.isolation.run_isolated`, one side after the other, so memory numbers are
not polluted by the other side). In order: load (memory after load), decode at every batch size
(the decode memory peak), perplexity over the evaluation windows (with the side's per-window
outputs: the fp16 side writes the top-k reference, the GPTQ side scores against it), lm-eval
tasks, and last, on the GPTQ side, the exact KL divergence and top-1 agreement against the fp16
model loaded next to it where both fit (:func:`modelfactory.benchmark.agreement.exact_agreement`).

Both sides time their decode with the same treatment: the GPTQ side is handed the one the fp16
side used; a treatment that fails its check against the eager model falls back to the plain graph
(``allow_fallback``), and the step then measures the fp16 side again with that common fallback
(``modelfactory.tasks.benchmark``), so a speed-up never compares two treatments.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from modelfactory.benchmark.agreement import AgreementScorer, ReferenceWriter, exact_agreement
from modelfactory.benchmark.decode import batch_prompt, measure_decode, reference_decode
from modelfactory.benchmark.graph import GRAPH_TREATMENTS, GraphDecoder, GraphTreatment, measure_decode_graph
from modelfactory.benchmark.kernels import choose_decode_mode, choose_kernel, quantized_kernel_name
from modelfactory.benchmark.memory import MemoryProbe, disk_bytes, fits_next_to
from modelfactory.benchmark.perplexity import measure_perplexity, token_digest
from modelfactory.benchmark.task_eval import TaskEvalResult, evaluate_tasks
from modelfactory.core.devices import apply_memory_cap, out_of_memory_error, resolve_device, resolve_dtype
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.gpu_share import gpu_turn
from modelfactory.core.log import progress
from modelfactory.core.records import AgreementMetrics, Side, SideMetrics, TaskMetrics
from modelfactory.core.specs import AgreementSpec, BenchmarkSpec, DecodeSpec

#: The fp16 side's KL-divergence reference, a folder inside its step folder.
REFERENCE_DIR = "agreement-reference"
#: The GPTQ side's agreement statistics, written by its process into the candidate's step folder.
AGREEMENT_FILE = "agreement.json"
#: Greedy steps of the eager reference each decode-step treatment is checked against.
CHECK_STEPS = 32


def load_side(model_path: str, *, side: Side, spec: BenchmarkSpec, device: str, dtype):
    """Load one side with plain transformers (GPTQ through its GPTQModel integration, with the kernel
    :func:`~modelfactory.benchmark.kernels.choose_kernel` picks): ``(model, requested kernel)``."""
    import json

    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs: dict = {"dtype": dtype, "device_map": device}
    kernel = "dense"
    if side == "gptq":
        config = json.loads((Path(model_path) / "config.json").read_text())
        qcfg = config["quantization_config"]
        kernel = choose_kernel(spec.kernel, device=device, group_size=qcfg["group_size"],
                               in_features=[config["hidden_size"], config.get("intermediate_size", config["hidden_size"])])
        kwargs["quantization_config"] = GPTQConfig(bits=qcfg["bits"], backend=kernel)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.eval()
    return model, kernel


def eager_on_cpu(device: str) -> contextlib.AbstractContextManager:
    """While entered, ``torch.compile`` is off on CPU (a no-op context on a GPU).

    Artifacts run eagerly on CPU: GPTQModel's torch kernel would otherwise torch.compile its
    dequantization per layer shape, which costs minutes on a small CPU and is not what we measure.
    Scoped (``config.patch``), so the calling process's ``torch.compile`` works as before afterwards.
    """
    import torch

    return torch._dynamo.config.patch(disable=True) if device == "cpu" else contextlib.nullcontext()


def measure_side(*, model_path: str, side: Side, spec: dict, text: str, text_origin: str,
                 treatment: GraphTreatment | None = None, allow_fallback: bool = True, out_dir: str | None = None,
                 reference_dir: str | None = None, baseline_model_path: str | None = None) -> SideMetrics:
    """Process body: :func:`_measure_side`, with CUDA out-of-memory turned into a clear, final error.

    *text* is the evaluation text (loaded by the step, ``benchmark.perplexity.text``); *treatment*
    the CUDA-graph decode treatment (default: ``decode.graph_treatment``); *allow_fallback*: a
    treatment failing its check falls back to the plain graph (else the side fails). *out_dir*: the
    side's step folder under construction, *reference_dir*: the fp16 side's folder, and
    *baseline_model_path* the fp16 model, for the GPTQ side's agreement (:func:`window_outputs`).
    """
    import torch

    bspec = BenchmarkSpec.model_validate(spec)
    device = resolve_device(bspec.device)
    try:
        with eager_on_cpu(device):
            return _measure_side(model_path=model_path, side=side, spec=bspec,
                                 text=text, text_origin=text_origin, treatment=treatment,
                                 allow_fallback=allow_fallback, out_dir=_path(out_dir),
                                 reference_dir=_path(reference_dir), baseline_model_path=baseline_model_path)
    except torch.OutOfMemoryError as exc:
        raise out_of_memory_error(f"benchmark ({side})", model_path=model_path, device=device, exc=exc,
                                  advice="lower benchmark.perplexity.context_len, decode.new_tokens or the largest of "
                                         "decode.batch_sizes, or run on a GPU with more free memory") from exc


class WindowOutputs:
    """Per-window outputs of one side's perplexity pass: the hook (:meth:`__call__`) and :meth:`finish`.

    fp16 side: the KL-divergence reference (top-k log-probs + residual mass per position,
    :class:`~modelfactory.benchmark.agreement.ReferenceWriter`) into its own step folder;
    GPTQ side: KL (a lower bound) and top-1 agreement of its own distributions against that reference
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
    positions and their target ids (:func:`modelfactory.benchmark.perplexity.measure_perplexity`), so it
    sees exactly the tokens whose digest proves both sides scored the same text. *out_dir* is the side's
    own step folder under construction — for the fp16 side ``benchmark-fp16/<key>/``, committed and
    reused together with ``fp16.json`` by every configuration of the merged model — and *reference_dir*
    the committed fp16 folder (GPTQ side only). The fp16 side writes its KL-divergence reference (top-k
    log-probs per window) into ``out_dir/REFERENCE_DIR``, and the GPTQ side reads it back from
    ``reference_dir/REFERENCE_DIR`` to compare its own distribution with.
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


def _measure_side(*, model_path: str, side: Side, spec: BenchmarkSpec, text: str, text_origin: str,
                  treatment: GraphTreatment | None, allow_fallback: bool, out_dir: Path | None,
                  reference_dir: Path | None, baseline_model_path: str | None) -> SideMetrics:
    """Load one model and measure it (the module docstring says in which order)."""
    import gptqmodel  # noqa: F401 - imported on both sides before the memory baseline, so its
    import torch  # footprint is not counted as model memory on one side only
    from transformers import AutoTokenizer

    device = resolve_device(spec.device)
    apply_memory_cap(device)
    dtype_name = resolve_dtype(spec.dtype, device)
    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if spec.perplexity.max_tokens:
        ids = ids[: spec.perplexity.max_tokens]
    prompt_ids = tokenizer(spec.decode.prompt, return_tensors="pt")["input_ids"].to(device)

    probe = MemoryProbe(device=device)
    with gpu_turn(device, exclusive=False, what=f"benchmark[{side}] load"):
        start = time.perf_counter()
        model, requested_kernel = load_side(model_path, side=side, spec=spec, device=device, dtype=dtype)
        load_s = time.perf_counter() - start
    mem_after_load = probe.current()
    kernel = quantized_kernel_name(model) if side == "gptq" else "dense"
    progress(f"benchmark[{side}]: loaded in {load_s:.1f} s on {device}/{dtype_name}, kernel {kernel}"
             + (f" (requested {requested_kernel})" if side == "gptq" else ""))

    probe.reset_peak()
    dspec = spec.decode
    decode_mode = choose_decode_mode(dspec.mode, device=device)
    # Timed: the GPU to itself (another sweep member's GPU work waits: modelfactory.core.gpu_share).
    with gpu_turn(device, exclusive=True, what=f"benchmark[{side}] decode timing"):
        if decode_mode == "cuda_graph":
            model, decoded, used, checks = graph_decode_checked(
                model, prompt_ids=prompt_ids, dspec=dspec, treatment=treatment or dspec.graph_treatment, probe=probe,
                allow_fallback=allow_fallback,
                reload=lambda: load_side(model_path, side=side, spec=spec, device=device, dtype=dtype)[0])
            recorded_mode = f"cuda_graph:{used}"
            for batch, check in checks.items():
                progress(f"benchmark[{side}]: {used} at batch {batch} vs eager reference: max logits rel err "
                         f"{check.logits_max_rel_err:.2e}, top-1 {check.teacher_forced_top1_agreement:.2f}")
        else:
            decoded = _eager_decode(model, prompt_ids=prompt_ids, dspec=dspec, device=device, probe=probe)
            recorded_mode = decode_mode
    compile_s = sum(run.compile_s for run in decoded.values())
    tok_s = {batch: run.tok_s for batch, run in decoded.items() if run.tok_s is not None}
    first = decoded[1]  # batch 1: decode_tok_s, ttft, the sample text and the decode memory peak
    progress(f"benchmark[{side}]: decode ({recorded_mode}) " + ", ".join(
        f"batch {batch}: " + (f"{run.tok_s:.1f} tok/s" if run.tok_s is not None else "not measured (no positive interval)")
        for batch, run in decoded.items()) + f"; ttft {first.ttft_s * 1000:.0f} ms")

    with gpu_turn(device, exclusive=False, what=f"benchmark[{side}] quality"):  # not during another's timing
        progress(f"benchmark[{side}]: perplexity over {len(ids)} tokens of {text_origin}")
        outputs = window_outputs(side=side, out_dir=out_dir, reference_dir=reference_dir, agreement=spec.agreement)
        ppl = measure_perplexity(model, ids=ids, context_len=spec.perplexity.context_len, stride=spec.perplexity.stride,
                                 device=device, on_window=outputs)
        progress(f"benchmark[{side}]: perplexity {ppl:.3f}")
        task_fields: dict = {}
        if spec.tasks.names:
            # The loaded model as it is (the GPTQ side with the benchmark's kernel selection) through lm-eval's HF wrapper.
            progress(f"benchmark[{side}]: lm-eval {', '.join(spec.tasks.names)} (limit {spec.tasks.limit})")
            evaluated = evaluate_tasks(model=model, tokenizer=tokenizer, tasks=spec.tasks.names,
                                       limit=spec.tasks.limit, batch_size=spec.tasks.batch_size)
            task_fields = {"tasks": _task_metrics(evaluated), "tasks_lm_eval_version": evaluated.lm_eval_version,
                           "tasks_limit": evaluated.limit}
            progress(f"benchmark[{side}]: " + "; ".join(
                f"{t}: acc {m.acc}, acc_norm {m.acc_norm} ({m.n_docs} docs)" for t, m in task_fields["tasks"].items()))
        mem_peak = max(probe.peak(), first.mem_peak_bytes)  # before the agreement pass loads the fp16 model too
        if outputs is not None and (bound := outputs.finish()) is not None:
            stats = _agreement(model, bound=bound, ids=ids, spec=spec, device=device, dtype=dtype, kernel=kernel,
                               baseline_model_path=baseline_model_path)
            # The process returns one record; the agreement travels next to it in the step folder under construction.
            (out_dir / AGREEMENT_FILE).write_text(stats.model_dump_json(indent=2))
        return SideMetrics(**task_fields,
            side=side, device=device if device == "cpu" else torch.cuda.get_device_name(), dtype=dtype_name,
            kernel=kernel, disk_bytes=disk_bytes(Path(model_path)), load_s=load_s, compile_s=compile_s,
            memory_kind=probe.kind,
            mem_after_load_bytes=mem_after_load, mem_peak_decode_bytes=first.mem_peak_bytes, mem_peak_bytes=mem_peak,
            decode_tok_s=first.tok_s, ttft_ms=first.ttft_s * 1000, decode_mode=recorded_mode, decode_tok_s_by_batch=tok_s,
            perplexity=ppl, ppl_tokens=len(ids), ppl_tokens_sha256=token_digest(ids),
            sample_text=tokenizer.decode(first.output_ids[0], skip_special_tokens=True),
        )


def _agreement(model, *, bound: AgreementMetrics, ids: list[int], spec: BenchmarkSpec, device: str, dtype,
               kernel: str, baseline_model_path: str | None) -> AgreementMetrics:
    """The GPTQ side's agreement record: exact (the fp16 model loaded next to this one, every window's full
    distributions compared) where both fit, else the top-k lower bound *bound*, which the gate never uses."""
    import torch

    fits, why = (False, "the fp16 model's folder was not given") if baseline_model_path is None else fits_next_to(
        Path(baseline_model_path), device=device, dtype=dtype)
    if not fits:
        progress(f"benchmark[gptq]: KL(fp16||gptq) top-{bound.top_k} lower bound only ({why}): mean "
                 f"{bound.kld_mean:.4g}, p99 {bound.kld_p99:.4g} nats; top-1 agreement {bound.top1_agreement_pct:.2f} %")
        return bound.model_copy(update={"kernel": kernel, "kld_method_note": why})
    progress(f"benchmark[gptq]: exact KL: loading the fp16 model next to this one ({why})")
    reference, _ = load_side(baseline_model_path, side="fp16", spec=spec, device=device, dtype=dtype)
    exact = exact_agreement(model, reference, ids=ids, context_len=spec.perplexity.context_len,
                            stride=spec.perplexity.stride, device=device, lower_bound=bound)
    del reference
    if device == "cuda":
        torch.cuda.empty_cache()
    progress(f"benchmark[gptq]: KL(fp16||gptq) exact: mean {exact.kld_mean:.4g}, p99 {exact.kld_p99:.4g} nats "
             f"(top-{bound.top_k} lower bound {bound.kld_mean:.4g}); top-1 agreement {exact.top1_agreement_pct:.2f} %")
    return exact.model_copy(update={"kernel": kernel})


def _path(folder: str | None) -> Path | None:
    return None if folder is None else Path(folder)


@dataclass(frozen=True, slots=True)
class _Decoded:
    """One batch size's timed decode."""

    ttft_s: float
    tok_s: float | None  # all sequences' tokens; None: not measured (no positive interval)
    output_ids: object  # (B, prompt + new tokens)
    mem_peak_bytes: int  # the probe's peak since the decode phase began, read right after this batch
    compile_s: float = 0.0  # torch.compile's warm-up of this batch size's decode step (0: not compiled)


def _eager_decode(model, *, prompt_ids, dspec: DecodeSpec, device: str, probe: MemoryProbe) -> dict[int, _Decoded]:
    """HF ``generate`` at every batch size (ascending, from 1) of *dspec*."""
    decoded = {}
    for batch in dspec.batch_sizes:
        ttft_s, tok_s, out = measure_decode(model, input_ids=batch_prompt(prompt_ids, batch),
                                            new_tokens=dspec.new_tokens, warmup=dspec.warmup,
                                            repeats=dspec.repeats, device=device)
        decoded[batch] = _Decoded(ttft_s=ttft_s, tok_s=tok_s, output_ids=out, mem_peak_bytes=probe.peak())
    return decoded


def graph_decode_checked(model, *, prompt_ids, dspec: DecodeSpec, treatment: GraphTreatment, probe: MemoryProbe,
                         reload: Callable[[], object], allow_fallback: bool = True):
    """CUDA-graph decode with *treatment* at every batch size of *dspec*, each checked against the
    batch-1 eager reference first.

    A treatment whose logits drift from the eager model's at any batch size
    (:attr:`modelfactory.benchmark.graph.DecodeCheck.passed`) is not used: with *allow_fallback* the
    model is reloaded and every batch size is measured again with the plain graph, so all of a side's
    rates come from one treatment; without, the side fails. Returns
    ``(model, {batch: _Decoded}, treatment_used, {batch: DecodeCheck})``.
    """
    import torch

    ref_tokens, ref_logits = reference_decode(model, input_ids=prompt_ids, steps=CHECK_STEPS)
    while True:
        opts = GRAPH_TREATMENTS[treatment]
        if opts.fuse:  # in place, once: every batch size's decoder runs on the fused model
            from modelfactory.benchmark.fusion import fuse_projections

            fuse_projections(model, marlin_atomics=opts.marlin_atomics)
        decoded, checks = {}, {}
        for batch in dspec.batch_sizes:
            decoder = GraphDecoder(model, input_ids=batch_prompt(prompt_ids, batch), max_new_tokens=dspec.new_tokens,
                                   compile=opts.compile)
            check = checks[batch] = decoder.check(ref_tokens=ref_tokens, ref_logits=ref_logits)
            if not check.passed:
                break
            ttft_s, tok_s, out = measure_decode_graph(model, input_ids=decoder.input_ids, new_tokens=dspec.new_tokens,
                                                      warmup=dspec.warmup, repeats=dspec.repeats, decoder=decoder)
            decoded[batch] = _Decoded(ttft_s=ttft_s, tok_s=tok_s, output_ids=out if batch == 1 else None,
                                      mem_peak_bytes=probe.peak(), compile_s=decoder.compile_s)
            del decoder, out  # its static cache and graph pool before the next batch size's
            torch.cuda.empty_cache()
        else:
            return model, decoded, treatment, checks
        if treatment == "graph" or not allow_fallback:
            raise BenchmarkError(f"CUDA-graph decode ({treatment}) at batch {batch} disagrees with the eager model: "
                                 f"{asdict(check)}")
        progress(f"benchmark: {treatment} failed its check against the eager model at batch {batch} "
                 f"({asdict(check)}): plain graph instead")
        del decoder, model
        torch.cuda.empty_cache()
        model = reload()
        treatment = "graph"
