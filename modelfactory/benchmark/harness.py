"""The one benchmark harness both sides (fp16 baseline and GPTQ) go through.

Method (the same code, tokens and settings for both sides):

- **Perplexity**: the evaluation text is tokenized once (no special tokens), cut to
  ``max_tokens``, and scored in windows of ``context_len`` tokens moved by ``stride``; with a
  stride below the context, only the last ``stride`` tokens of a window are scored (the HF
  "sliding window" method); no token is scored twice (see :func:`perplexity_windows`).
  ppl = exp(mean NLL over the scored tokens).
  The sha256 of the scored token ids is recorded, proving both sides saw the same tokens.
- **Decode**: batch 1, greedy, after ``warmup`` untimed runs; ``decode_tok_s`` is
  ``(N - 1) / (t_N - t_1)`` with medians over ``repeats``: the steady decode rate without the
  prefill; ``ttft_ms`` is the median t_1 (prefill + first token). On CUDA (mode ``auto``) the
  decode step runs as a hand-captured CUDA graph over a static KV cache for *both* sides
  (:func:`measure_decode_graph`); on CPU it is HF ``generate`` (:func:`measure_decode`).
- **Memory**: on CUDA, the caching allocator's allocated bytes after load and its peak while
  decoding / overall; on CPU, the process RSS delta over the pre-load RSS, and the peak RSS
  (VmHWM, reset via ``/proc/self/clear_refs`` before each phase). Each side runs in a fresh
  process, so nothing of the other side is counted.
- **Disk**: bytes of the ``*.safetensors`` files.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from modelfactory.core.log import progress


# --------------------------------------------------------------------------- pure math
@dataclass(frozen=True, slots=True)
class Window:
    begin: int
    end: int
    scored: int  # the last `scored` tokens of [begin, end) are predicted and counted


def perplexity_windows(n_tokens: int, *, context_len: int, stride: int) -> list[Window]:
    """Windows over ``n_tokens``; no token is scored twice.

    With ``stride < context_len`` every token after the first is scored once, each with at least
    ``context_len - stride`` tokens of context; with ``stride == context_len`` the windows are
    disjoint and each window's first token (which has no context) is not scored.
    """
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_len, n_tokens)
        scored = min(end - prev_end, end - begin - 1)  # the window's first token has no context
        if scored <= 0:
            break
        windows.append(Window(begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity_from_nll(total_nll: float, n_scored: int) -> float:
    return math.exp(total_nll / n_scored)


def decode_rate(t_first: float, t_all: float, new_tokens: int) -> float:
    """Tokens per second of the decode phase, prefill excluded."""
    return (new_tokens - 1) / max(t_all - t_first, 1e-9)


def token_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def choose_kernel(requested: str, *, device: str, group_size: int, in_features: list[int]) -> str:
    """The GPTQModel backend to load with (an explicit request is kept as is).

    ``auto`` on CUDA is Marlin when every layer width is a multiple of 128 (Marlin's tile), else
    Triton. GPTQModel's own ``auto`` picks Machete on Hopper, which downloads CUTLASS on first
    use and so fails on offline GPU hosts; Marlin was the fastest kernel measured on an H100
    (docs/benchmarks.md). On CPU, ``auto`` lets GPTQModel pick, except when a layer width is not a
    multiple of the group size: its default CPU kernel (ATen int4pack) rejects that (SmolLM2's
    576-wide layers with group 128), so the portable ``gptq_torch`` kernel is used instead.
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "gptq_marlin" if all(k % 128 == 0 for k in in_features) else "gptq_triton"
    if group_size > 0 and any(k % group_size for k in in_features):
        return "gptq_torch"
    return "auto"


def choose_decode_mode(requested: str, *, device: str) -> str:
    """``auto``: CUDA-graph decode on CUDA (see :func:`measure_decode_graph`), HF generate on CPU."""
    if requested == "auto":
        return "cuda_graph" if device == "cuda" else "eager"
    if requested == "cuda_graph" and device != "cuda":
        from modelfactory.core.errors import SpecError

        raise SpecError("benchmark.decode.mode 'cuda_graph' needs a CUDA device: use 'auto' or 'eager' on CPU")
    return requested


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class MemoryProbe:
    """Allocated CUDA bytes, or process RSS bytes on CPU, relative to a baseline."""

    def __init__(self, device: str) -> None:
        import torch

        self._torch = torch
        self.kind = "cuda_allocated" if device == "cuda" else "rss"
        self.baseline = self.current_absolute()

    def current_absolute(self) -> int:
        if self.kind == "cuda_allocated":
            self._torch.cuda.synchronize()
            return self._torch.cuda.memory_allocated()
        return _status_kb("VmRSS") * 1024

    def current(self) -> int:
        return self.current_absolute() - self.baseline

    def reset_peak(self) -> None:
        if self.kind == "cuda_allocated":
            self._torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

    def peak(self) -> int:
        if self.kind == "cuda_allocated":
            self._torch.cuda.synchronize()
            return self._torch.cuda.max_memory_allocated() - self.baseline
        return _status_kb("VmHWM") * 1024 - self.baseline


# --------------------------------------------------------------------------- measurements
def measure_perplexity(model, ids: list[int], *, context_len: int, stride: int, device: str) -> float:
    import torch

    windows = perplexity_windows(len(ids), context_len=context_len, stride=stride)
    total_nll, n_scored = 0.0, 0
    tokens = torch.tensor(ids, dtype=torch.long)
    last_report = time.perf_counter()
    with torch.inference_mode():
        for i, w in enumerate(windows):
            chunk = tokens[w.begin : w.end].unsqueeze(0).to(device)
            logits = model(input_ids=chunk).logits[0, -w.scored - 1 : -1].float()
            targets = chunk[0, -w.scored :]
            total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            n_scored += w.scored
            if time.perf_counter() - last_report > 10:
                progress(f"benchmark: perplexity window {i + 1}/{len(windows)}")
                last_report = time.perf_counter()
    return perplexity_from_nll(total_nll, n_scored)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _timed_generate(model, input_ids, new_tokens: int, device: str):
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids, attention_mask=input_ids.new_ones(input_ids.shape), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.generation_config.pad_token_id,
    )
    _sync(device)
    return time.perf_counter() - start, out


def measure_decode(model, input_ids, *, new_tokens: int, warmup: int, repeats: int, device: str):
    """Returns ``(ttft_s, decode_tok_s, output_ids)`` — see the module docstring for the method."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            _timed_generate(model, input_ids, new_tokens, device)
        firsts, alls, out = [], [], None
        for _ in range(repeats):
            firsts.append(_timed_generate(model, input_ids, 1, device)[0])
            elapsed, out = _timed_generate(model, input_ids, new_tokens, device)
            alls.append(elapsed)
    t_first, t_all = statistics.median(firsts), statistics.median(alls)
    return t_first, decode_rate(t_first, t_all, new_tokens), out


def quantized_kernel_name(model) -> str:
    """Class name of the first GPTQ linear layer (e.g. ``TorchAtenLinear``), or ``dense``."""
    for module in model.modules():
        if any(cls.__name__ == "BaseQuantLinear" for cls in type(module).__mro__):
            return type(module).__name__
    return "dense"


# --------------------------------------------------------------------------- decode-step treatments
#: How the one-token decode step is prepared before its CUDA graph is captured (the same for both
#: sides): ``fuse`` concatenates q/k/v and gate/up into one GEMM each (dense and Marlin layers),
#: ``compile`` runs the step through ``torch.compile`` (Inductor fuses RMSNorm, rotary, SiLU*mul,
#: residual adds) with every quantized linear kept as one opaque custom op. The factory's default
#: is the fastest treatment that passed its logits check on the H100 (docs/benchmarks.md).
GRAPH_TREATMENTS: dict[str, dict[str, bool]] = {
    "graph": {"fuse": False, "compile": False},
    "fused_graph": {"fuse": True, "compile": False},
    "compiled_graph": {"fuse": False, "compile": True},
    "fused_compiled_graph": {"fuse": True, "compile": True},
    # measured only: Marlin's atomic-add reduce on every Marlin GEMM (GPTQModel enables it only for N < 2048)
    "fused_compiled_graph_atomics": {"fuse": True, "compile": True, "marlin_atomics": True},
}
DEFAULT_GRAPH_TREATMENT = "fused_compiled_graph"

_OPAQUE_MODULES: list = []  # quantized linears reached through torch.ops.modelfactory.opaque_linear


def _opaque_op():
    """``torch.ops.modelfactory.opaque_linear(x, index)``: runs ``_OPAQUE_MODULES[index]`` eagerly.

    torch.compile cannot trace GPTQModel's kernels (Python-side dispatch, no fake tensors); as a
    custom op with a shape-only fake implementation the kernel is one opaque node in the
    compiled graph and still launches (and is captured in the CUDA graph) as itself.
    """
    import torch

    if not hasattr(torch.ops.modelfactory, "opaque_linear"):
        @torch.library.custom_op("modelfactory::opaque_linear", mutates_args=(),
                                 schema="(Tensor x, int index) -> Tensor")
        def opaque_linear(x: torch.Tensor, index: int) -> torch.Tensor:
            return _OPAQUE_MODULES[index]._mf_eager_forward(x)

        @opaque_linear.register_fake
        def _(x, index):
            return x.new_empty((*x.shape[:-1], _OPAQUE_MODULES[index].out_features))

    return torch.ops.modelfactory.opaque_linear


def _is_quant_linear(module) -> bool:
    return any(cls.__name__ == "BaseQuantLinear" for cls in type(module).__mro__) or getattr(
        module, "_mf_opaque", False)


def make_quant_linears_opaque(model) -> int:
    """Route every quantized linear of *model* through the opaque custom op (idempotent)."""
    op = _opaque_op()
    count = 0
    for module in model.modules():
        if _is_quant_linear(module) and not hasattr(module, "_mf_eager_forward"):
            module._mf_eager_forward = module.forward
            index = len(_OPAQUE_MODULES)
            _OPAQUE_MODULES.append(module)
            module._mf_opaque_index = index
            module.forward = lambda x, _i=index: op(x, _i)
            count += 1
    return count


class _FusedMarlin:
    """Marker base for the fused Marlin module (see :func:`_fuse_marlin`)."""


def _fuse_marlin(parts: list, atomics: bool = False):
    """One Marlin GEMM over the output columns of *parts* (same input, no act-order, no bias).

    Marlin's packed weight is laid out row-major over (16-row k tile, 64-column n tile) and its
    scale permutation acts within 64-column chunks, so concatenating packed weights and scales
    along the output dimension equals packing the concatenated GPTQ weight when every part's
    width is a multiple of 64. :func:`fuse_projections` checks the result numerically.
    """
    import torch
    from gptqmodel.utils.marlin import apply_gptq_marlin_linear, gptq_marlin_gemm

    first = parts[0]
    for p in parts:
        if p.desc_act or p.bias is not None or p._marlin_tile_padding is not None or p.out_features % 64:
            raise ValueError(f"cannot fuse Marlin layer {type(p).__name__} (act-order, bias or padding)")

    class FusedMarlinLinear(torch.nn.Module, _FusedMarlin):
        _mf_opaque = True

        def __init__(self) -> None:
            super().__init__()
            self.in_features = first.in_features
            self.out_features = sum(p.out_features for p in parts)
            self.register_buffer("qweight", torch.cat([p.qweight.data for p in parts], dim=1), persistent=False)
            self.register_buffer("scales", torch.cat([p.scales.data for p in parts], dim=1), persistent=False)
            self.qzeros, self.g_idx, self.g_idx_sort_indices = first.qzeros, first.g_idx, first.g_idx_sort_indices
            self.workspace, self.weight_type, self.is_k_full, self.fp32 = (
                first.workspace, first.weight_type, first.is_k_full, first.fp32)

        def forward(self, x):
            if atomics:
                flat = x.reshape(-1, x.shape[-1])
                out = gptq_marlin_gemm(flat, None, self.qweight, None, self.scales, None, self.qzeros, self.g_idx,
                                       self.g_idx_sort_indices, self.workspace, self.weight_type,
                                       size_m=flat.shape[0], size_n=self.out_features, size_k=self.in_features,
                                       is_k_full=self.is_k_full, use_atomic_add=True, use_fp32_reduce=self.fp32,
                                       is_zp_float=False)
                return out.reshape(*x.shape[:-1], self.out_features)
            return apply_gptq_marlin_linear(
                input=x, weight=self.qweight, weight_scale=self.scales, weight_zp=self.qzeros, g_idx=self.g_idx,
                g_idx_sort_indices=self.g_idx_sort_indices, workspace=self.workspace, wtype=self.weight_type,
                output_size_per_partition=self.out_features, input_size_per_partition=self.in_features,
                is_k_full=self.is_k_full, bias=None, use_fp32_reduce=self.fp32, use_atomics=False)

    return FusedMarlinLinear()


def _fuse_dense(parts: list):
    import torch

    fused = torch.nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                            bias=parts[0].bias is not None, device=parts[0].weight.device, dtype=parts[0].weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts], dim=0))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts], dim=0))
    return fused


def _fuse(parts: list, marlin_atomics: bool = False):
    """One module computing all *parts* (same input); the parts' weight storage is released."""
    import torch

    if all(type(p) is torch.nn.Linear for p in parts):
        fused, names = _fuse_dense(parts), ("weight", "bias")
    elif all(type(p).__name__ == "MarlinLinear" for p in parts):
        fused, names = _fuse_marlin(parts, marlin_atomics), ("qweight", "scales")
        for p in parts:  # the separate modules must not stay alive through the opaque-op registry
            if hasattr(p, "_mf_opaque_index"):
                _OPAQUE_MODULES[p._mf_opaque_index] = None
    else:
        raise ValueError(f"cannot fuse {[type(p).__name__ for p in parts]}: only dense and Marlin layers")
    for p in parts:  # free now, not at the next gc: fusing must not hold two copies of the weights
        for name in names:
            tensor = getattr(p, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.new_empty(0)
    return fused


def _fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                             past_key_values=None, **kwargs):
    """transformers' LlamaAttention.forward with q/k/v computed by one GEMM (``self.qkv_proj``)."""
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = self.qkv_proj(hidden_states)
    q, k, v = qkv.split(self.qkv_split, dim=-1)
    query_states = q.reshape(hidden_shape).transpose(1, 2)
    key_states = k.reshape(hidden_shape).transpose(1, 2)
    value_states = v.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask,
                                                    dropout=0.0, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _fused_mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).split(self.gate_up_split, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model, *, marlin_atomics: bool = False) -> int:
    """Replace q/k/v and gate/up of every Llama-style layer by one GEMM each (in place).

    Dense layers: concatenated fp16 weights (cuBLAS). Marlin layers: concatenated packed weights.
    The separate modules are freed. Returns the number of layers fused; layers of other shapes
    or kernels are left alone. ``marlin_atomics``: every Marlin GEMM (o/down too) uses Marlin's
    atomic-add reduce (measured option, not the default).
    """
    import types

    fused = 0
    if marlin_atomics:
        for module in list(model.modules()):
            for name in ("o_proj", "down_proj"):
                child = getattr(module, name, None)
                if child is not None and type(child).__name__ == "MarlinLinear":
                    setattr(module, name, _fuse(
                        [child], marlin_atomics=True))
    for module in list(model.modules()):
        if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            parts = [module.q_proj, module.k_proj, module.v_proj]
            try:
                module.qkv_proj = _fuse(parts, marlin_atomics)
            except ValueError:
                continue
            module.qkv_split = [p.out_features for p in parts]
            del module.q_proj, module.k_proj, module.v_proj
            module.forward = types.MethodType(_fused_attention_forward, module)
            fused += 1
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            parts = [module.gate_proj, module.up_proj]
            try:
                module.gate_up_proj = _fuse(parts, marlin_atomics)
            except ValueError:
                continue
            module.gate_up_split = [p.out_features for p in parts]
            del module.gate_proj, module.up_proj
            module.forward = types.MethodType(_fused_mlp_forward, module)
            fused += 1
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return fused


def reference_decode(model, input_ids, *, steps: int):
    """Eager greedy decode over a StaticCache (no graph, no compile): ``(tokens, logits)``.

    ``tokens[i]`` is the i-th generated token (``tokens[0]`` from the prefill), ``logits[i]`` the
    float32 logits it was chosen from (on the CPU). The reference every treatment is checked against.
    """
    import torch
    from transformers import StaticCache

    prompt_len = input_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps + 1)
    tokens, logits = [], []
    with torch.inference_mode():
        out = model(input_ids=input_ids, past_key_values=cache, cache_position=torch.arange(prompt_len,
                    device=input_ids.device), use_cache=True).logits[:, -1]
        for i in range(steps):
            tokens.append(int(out.argmax(-1)))
            logits.append(out[0].float().cpu())
            if i == steps - 1:
                break
            pos = torch.tensor([prompt_len + i], device=input_ids.device)
            out = model(input_ids=torch.tensor([[tokens[-1]]], device=input_ids.device), past_key_values=cache,
                        cache_position=pos, position_ids=pos.unsqueeze(0), use_cache=True).logits[:, -1]
    return tokens, torch.stack(logits)


def _rel_err(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class GraphDecoder:
    """Greedy batch-1 decode: a static KV cache and a hand-captured CUDA graph of one step.

    The captured step is embedding → all layers → argmax → position += 1, so replaying it needs no
    host work at all; :meth:`prefill` (not captured) resets the cache and runs the prompt.
    ``compile=True`` runs the step's model call through ``torch.compile`` (Inductor, without its
    own CUDA graphs) before the capture, with quantized linears as opaque custom ops; fusing the
    projections is done on the model beforehand (:func:`fuse_projections`).
    """

    def __init__(self, model, input_ids, *, max_new_tokens: int, compile: bool = False) -> None:
        import torch
        from transformers import StaticCache

        self.model, self.input_ids = model, input_ids
        self.prompt_len = input_ids.shape[1]
        device = input_ids.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_len + max_new_tokens + 1)
        self.prompt_pos = torch.arange(self.prompt_len, device=device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        self.compile_s = 0.0
        self._forward = self._model_step
        if compile:
            make_quant_linears_opaque(model)
            self._forward = torch.compile(self._model_step, fullgraph=False, dynamic=False)
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy cache allocation, autotuning, compilation
                start = time.perf_counter()
                self.prefill()
                for _ in range(3):
                    self._step()
                torch.cuda.synchronize()
                self.compile_s = time.perf_counter() - start if compile else 0.0
            torch.cuda.current_stream().wait_stream(side)
            self.prefill()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()  # graph-owned: holds each replay's logits

    def _model_step(self, token, position):
        logits = self.model(input_ids=token, past_key_values=self.cache, cache_position=position,
                            position_ids=position.unsqueeze(0), use_cache=True).logits[:, -1]
        return logits, logits.argmax(-1, keepdim=True)

    def prefill(self) -> None:
        self.cache.reset()
        logits = self.model(input_ids=self.input_ids, past_key_values=self.cache, cache_position=self.prompt_pos,
                            use_cache=True).logits
        self.prefill_logits = logits[:, -1]
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(self.prompt_len)

    def _step(self):
        logits, token = self._forward(self.token, self.position)
        self.token.copy_(token)
        self.position.add_(1)
        return logits

    def generate(self, new_tokens: int) -> tuple[float, float, list]:
        """Returns ``(t_first_s, t_all_s, tokens)`` for one timed generation."""
        import torch

        with torch.inference_mode():
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.prefill()
            torch.cuda.synchronize()
            t_first = time.perf_counter() - start
            tokens = [self.token.clone()]
            for _ in range(new_tokens - 1):
                self.graph.replay()
                tokens.append(self.token.clone())
            torch.cuda.synchronize()
        return t_first, time.perf_counter() - start, tokens

    def check(self, ref_tokens: list[int], ref_logits) -> dict:
        """Compare this decoder with :func:`reference_decode`'s output.

        Teacher-forced: each step is fed the reference's previous token, and its logits are
        compared with the reference's (relative L2 error, top-1 agreement). Free-running: the
        greedy tokens of one replayed generation against the reference tokens.
        """
        import torch

        steps = len(ref_tokens)
        errs, top1 = [], 0
        with torch.inference_mode():
            self.prefill()
            errs.append(_rel_err(self.prefill_logits[0].float().cpu(), ref_logits[0]))
            top1 += int(self.prefill_logits[0].argmax()) == ref_tokens[0]
            for i in range(1, steps):
                self.token.fill_(ref_tokens[i - 1])
                self.graph.replay()
                got = self.logits[0].float().cpu()
                errs.append(_rel_err(got, ref_logits[i]))
                top1 += int(got.argmax()) == ref_tokens[i]
            free = [int(t) for t in self.generate(steps)[2]]
        prefix = next((i for i, (a, b) in enumerate(zip(free, ref_tokens)) if a != b), steps)
        return {"steps": steps, "logits_max_rel_err": max(errs), "logits_mean_rel_err": sum(errs) / steps,
                "teacher_forced_top1_agreement": top1 / steps, "free_run_token_agreement":
                sum(a == b for a, b in zip(free, ref_tokens)) / steps, "free_run_matching_prefix": prefix}


#: A treatment passes when its logits stay this close to the eager reference's on every checked
#: step (fp16 GEMMs reordered/fused and Inductor's fp32 norms move logits by ~1e-3).
MAX_LOGITS_REL_ERR = 2e-2


def check_passes(check: dict) -> bool:
    return check["logits_max_rel_err"] <= MAX_LOGITS_REL_ERR and check["teacher_forced_top1_agreement"] >= 0.9


def measure_decode_graph(model, input_ids, *, new_tokens: int, warmup: int, repeats: int, compile: bool = False,
                         decoder: GraphDecoder | None = None):
    """Batch-1 greedy decode through :class:`GraphDecoder`.

    HF ``generate`` is launch-bound at batch 1 (a 7B model spends more time launching kernels
    than running them), and ``torch.compile`` does not capture GPTQModel's kernels; a CUDA graph
    of the one-token step captures both dense and quantized layers, so both sides are measured
    the same, launch-free way. Returns ``(ttft_s, decode_tok_s, output_ids)``; ttft is prefill +
    first token.
    """
    import torch

    if decoder is None:
        decoder = GraphDecoder(model, input_ids, max_new_tokens=new_tokens, compile=compile)
    for _ in range(max(warmup, 1)):
        decoder.generate(new_tokens)
    firsts, alls = [], []
    for _ in range(repeats):
        t_first, t_all, tokens = decoder.generate(new_tokens)
        firsts.append(t_first)
        alls.append(t_all)
    t_first, t_all = statistics.median(firsts), statistics.median(alls)
    return t_first, decode_rate(t_first, t_all, new_tokens), torch.cat([input_ids] + tokens, dim=1)
