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

from modelfactory.log import progress


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
        from modelfactory.errors import SpecError

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


class GraphDecoder:
    """Greedy batch-1 decode: a static KV cache and a hand-captured CUDA graph of one step.

    The captured step is embedding → all layers → argmax → position += 1, so replaying it needs no
    host work at all; :meth:`prefill` (not captured) resets the cache and runs the prompt.
    """

    def __init__(self, model, input_ids, *, max_new_tokens: int) -> None:
        import torch
        from transformers import StaticCache

        self.model, self.input_ids = model, input_ids
        self.prompt_len = input_ids.shape[1]
        device = input_ids.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_len + max_new_tokens + 1)
        self.prompt_pos = torch.arange(self.prompt_len, device=device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy cache allocation, kernel autotuning
                self.prefill()
                for _ in range(3):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.prefill()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()

    def prefill(self) -> None:
        self.cache.reset()
        logits = self.model(input_ids=self.input_ids, past_key_values=self.cache, cache_position=self.prompt_pos,
                            use_cache=True).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(self.prompt_len)

    def _step(self) -> None:
        logits = self.model(input_ids=self.token, past_key_values=self.cache, cache_position=self.position,
                            position_ids=self.position.unsqueeze(0), use_cache=True).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)

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


def measure_decode_graph(model, input_ids, *, new_tokens: int, warmup: int, repeats: int):
    """Batch-1 greedy decode through :class:`GraphDecoder`.

    HF ``generate`` is launch-bound at batch 1 (a 7B model spends more time launching kernels
    than running them), and ``torch.compile`` does not capture GPTQModel's kernels; a CUDA graph
    of the one-token step captures both dense and quantized layers, so both sides are measured
    the same, launch-free way. Returns ``(ttft_s, decode_tok_s, output_ids)``; ttft is prefill +
    first token.
    """
    import torch

    decoder = GraphDecoder(model, input_ids, max_new_tokens=new_tokens)
    for _ in range(max(warmup, 1)):
        decoder.generate(new_tokens)
    firsts, alls = [], []
    for _ in range(repeats):
        t_first, t_all, tokens = decoder.generate(new_tokens)
        firsts.append(t_first)
        alls.append(t_all)
    t_first, t_all = statistics.median(firsts), statistics.median(alls)
    return t_first, decode_rate(t_first, t_all, new_tokens), torch.cat([input_ids] + tokens, dim=1)
