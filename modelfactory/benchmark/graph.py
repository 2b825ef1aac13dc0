"""CUDA-graph decode: a static KV cache and a hand-captured graph of the one-token step (both sides).

HF ``generate`` is launch-bound at batch 1 (a 7B model spends more time launching kernels than
running them), and ``torch.compile`` does not capture GPTQModel's kernels; a CUDA graph of the
one-token step captures both dense and quantized layers, so both sides are measured the same,
launch-free way. Before its graph is captured the step may be prepared by a *treatment*
(:data:`GRAPH_TREATMENTS`); every prepared decoder is checked against the eager model
(:meth:`GraphDecoder.check`) before it is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from modelfactory.benchmark.decode import median_decode
from modelfactory.benchmark.kernels import make_quant_linears_opaque

#: The decode-step treatments. ``benchmark.decode.graph_treatment`` offers all but the last; its
#: default is the fastest that passed its logits check on the H100 (docs/benchmarks.md).
GraphTreatment = Literal["graph", "fused_graph", "compiled_graph", "fused_compiled_graph",
                         "fused_compiled_graph_atomics"]


@dataclass(frozen=True, slots=True)
class Treatment:
    """How the one-token decode step is prepared before its CUDA graph is captured (same for both sides).

    ``fuse``: q/k/v and gate/up concatenated into one GEMM each (dense and Marlin layers,
    :func:`modelfactory.benchmark.fusion.fuse_projections`). ``compile``: the step runs through
    ``torch.compile`` (Inductor fuses RMSNorm, rotary, SiLU*mul, residual adds) with every
    quantized linear kept as one opaque custom op. ``marlin_atomics``: Marlin's atomic-add
    reduce on every Marlin GEMM (GPTQModel enables it only for N < 2048).
    """

    fuse: bool
    compile: bool
    marlin_atomics: bool = False


GRAPH_TREATMENTS: dict[GraphTreatment, Treatment] = {
    "graph": Treatment(fuse=False, compile=False),
    "fused_graph": Treatment(fuse=True, compile=False),
    "compiled_graph": Treatment(fuse=False, compile=True),
    "fused_compiled_graph": Treatment(fuse=True, compile=True),
    "fused_compiled_graph_atomics": Treatment(fuse=True, compile=True, marlin_atomics=True),  # measured only
}

#: A treatment passes when its logits stay this close to the eager reference's on every checked
#: step (fp16 GEMMs reordered/fused and Inductor's fp32 norms move logits by ~1e-3).
MAX_LOGITS_REL_ERR = 2e-2
#: ... and when the reference's greedy token is the top-1 on at least this share of the steps.
MIN_TOP1_AGREEMENT = 0.9


@dataclass(frozen=True, slots=True)
class DecodeCheck:
    """A graph decoder against the eager reference (:meth:`GraphDecoder.check`)."""

    steps: int
    logits_max_rel_err: float
    logits_mean_rel_err: float
    teacher_forced_top1_agreement: float
    free_run_token_agreement: float
    free_run_matching_prefix: int

    @property
    def passed(self) -> bool:
        return (self.logits_max_rel_err <= MAX_LOGITS_REL_ERR
                and self.teacher_forced_top1_agreement >= MIN_TOP1_AGREEMENT)


def _rel_err(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class GraphDecoder:
    """Greedy decode: a static KV cache and a hand-captured CUDA graph of one step.

    *input_ids* is ``(B, L)``: B sequences of one length (the benchmark's prompt repeated,
    :func:`modelfactory.benchmark.decode.batch_prompt`), decoded together; the cache holds B
    sequences and every captured step produces B tokens. The captured step is embedding → all layers → argmax → position += 1, so replaying it needs no
    host work at all; :meth:`prefill` (not captured) resets the cache and runs the prompt.
    ``compile=True`` runs the step's model call through ``torch.compile`` (Inductor, without its
    own CUDA graphs) before the capture, with quantized linears as opaque custom ops; fusing the
    projections is done on the model beforehand (:func:`modelfactory.benchmark.fusion.fuse_projections`).
    """

    def __init__(self, model, *, input_ids, max_new_tokens: int, compile: bool = False) -> None:
        import torch
        from transformers import StaticCache

        self.model, self.input_ids = model, input_ids
        self.batch, self.prompt_len = input_ids.shape
        device = input_ids.device
        # Sized by the prefill: the cache allocates B sequences on first use (lazily, before the capture).
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_len + max_new_tokens + 1)
        self.prompt_pos = torch.arange(self.prompt_len, device=device)
        self.token = torch.zeros((self.batch, 1), dtype=torch.long, device=device)
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
        # All sequences are at the same position: one cache position, position ids broadcast to B rows.
        logits = self.model(input_ids=token, past_key_values=self.cache, cache_position=position,
                            position_ids=position.unsqueeze(0).expand(self.batch, -1), use_cache=True).logits[:, -1]
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
        """Returns ``(t_first_s, t_all_s, tokens)`` for one timed generation (*tokens*: one ``(B, 1)``
        tensor per step)."""
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

    def check(self, *, ref_tokens: list[int], ref_logits) -> DecodeCheck:
        """Compare this decoder with :func:`modelfactory.benchmark.decode.reference_decode`'s output.

        Teacher-forced: each step is fed the reference's previous token, and its logits are
        compared with the reference's (relative L2 error, top-1 agreement). Free-running: the
        greedy tokens of one replayed generation against the reference tokens. The reference is
        batch 1; at batch B every sequence is compared with it (the worst row's error, the share
        of all rows' positions that agree, the shortest matching prefix).
        """
        import torch

        steps = len(ref_tokens)
        errs, top1 = [], 0
        with torch.inference_mode():
            self.prefill()
            got = self.prefill_logits.float().cpu()
            for i in range(steps):
                if i:
                    self.token.fill_(ref_tokens[i - 1])
                    self.graph.replay()
                    got = self.logits.float().cpu()
                errs.append(max(_rel_err(row, ref_logits[i]) for row in got))
                top1 += int((got.argmax(-1) == ref_tokens[i]).sum())
            free = torch.cat(self.generate(steps)[2], dim=1).cpu()  # (B, steps)
        match = free == torch.tensor(ref_tokens)
        prefix = min(next((i for i, same in enumerate(row.tolist()) if not same), steps) for row in match)
        return DecodeCheck(steps=steps, logits_max_rel_err=max(errs), logits_mean_rel_err=sum(errs) / steps,
                           teacher_forced_top1_agreement=top1 / (steps * self.batch),
                           free_run_token_agreement=float(match.float().mean()),
                           free_run_matching_prefix=prefix)


def measure_decode_graph(model, *, input_ids, new_tokens: int, warmup: int, repeats: int, compile: bool = False,
                         decoder: GraphDecoder | None = None):
    """Greedy decode of the batch *input_ids* through :class:`GraphDecoder` (one is built unless
    *decoder* is given).

    Returns ``(ttft_s, decode_tok_s, output_ids)``; ttft is prefill + first token, the rate is
    :func:`modelfactory.benchmark.decode.decode_rate` over medians and all B sequences, as for the
    eager decode.
    """
    import torch

    if decoder is None:
        decoder = GraphDecoder(model, input_ids=input_ids, max_new_tokens=new_tokens, compile=compile)
    for _ in range(max(warmup, 1)):
        decoder.generate(new_tokens)
    firsts, alls = [], []
    for _ in range(repeats):
        t_first, t_all, tokens = decoder.generate(new_tokens)
        firsts.append(t_first)
        alls.append(t_all)
    ttft_s, tok_s = median_decode(firsts=firsts, alls=alls, new_tokens=new_tokens, batch=decoder.batch)
    return ttft_s, tok_s, torch.cat([decoder.input_ids] + tokens, dim=1)
