"""Distribution agreement with the fp16 model: per-token KL divergence and top-1 agreement.

The llama.cpp way of judging a quantization (``llama-perplexity --kl-divergence``): on the same
evaluation token windows as perplexity, compare the quantized model's next-token distribution Q
with the fp16 model's P at every scored position:

- ``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` per position, summarized as mean, median, p99, max;
- top-1 agreement: % of positions where the quantized model's most likely token is the fp16 model's
  (each side's ``argmax``: the lowest token id among tied maxima, so ties in bf16 logits count the
  same in every method).

Two methods (``AgreementMetrics.kld_method``): **exact**, the full-vocabulary KL with both models in
one process (:func:`exact_agreement`: the GPTQ side loads the fp16 model next to itself where both
fit, and both score every window), and **topk_lower_bound**, the fp16 side's stored top-k reference
(below), a lower bound of the full KL that is reported but never gated. The GPTQ side always computes
the bound and, where both models fit, the exact values too.

For the bound, the two sides run in separate fresh processes, so the fp16 side leaves what the
quantized side needs on disk (:class:`ReferenceWriter`) and the quantized side scores against it
(:class:`AgreementScorer`). Full log-probs do not fit (SmolLM2: 49,152 × 16k positions × 4 bytes
= 3.2 GB), so per scored position the fp16 side stores:

- ``ids``: its top-k token ids (sorted by probability, descending), int32 ``[n, k]``;
- ``logp``: their log-probabilities, float32 ``[n, k]``;
- ``argmax``: its most likely token id (``argmax`` of the logits: the lowest id among tied maxima),
  int32 ``[n]``, for top-1 agreement;
- ``rest_logp``: the log of the residual mass ``R = 1 - sum(top-k P)``, float32 ``[n]``; computed as a
  log-sum-exp over the other tokens, never as ``1 - sum`` (which cancels when the top-k hold almost
  all the mass);
- ``targets``: the scored token ids, int32 ``[n]``, so the quantized side is checked (position by
  position and by the sha256 digest in ``reference.json``) to score the very same tokens.

in ``chunk-NNNNN.safetensors`` files of ``chunk_positions`` positions, plus ``reference.json``
(:class:`ReferenceInfo`), written last: a folder without it is an unfinished reference.

**Error bound.** The KL is computed over k+1 buckets: the fp16 top-k tokens one by one, and every
other token merged into one residual bucket (mass ``R`` under P, ``R_Q`` under Q). Merging
categories never increases KL (log-sum inequality: ``sum_j p_j log(p_j/q_j) >= (sum p_j) log(sum p_j / sum q_j)``),
so the stored KL is a **lower bound** of the full-vocabulary KL, and the gap is exactly

    KL_full - KL_topk = R * KL(P_tail || Q_tail)      (P_tail, Q_tail: P and Q renormalized over the tail)

i.e. the fp16 model's residual mass times how much the quantized model reshapes the tail. It is 0
when the tail is reshaped proportionally, and shrinks as k grows (R -> 0). Measured on SmolLM2-135M,
GPTQ 4-bit g128 (docs/benchmarks.md): the stored mean is 26 % below the full KL at k=32, 10 % at
k=256, 2 % at k=2048 (p99: 8 %, 3 %, 0.5 %). :attr:`AgreementMetrics.rest_mass_mean` reports the
mean R of a run so the slack can be judged. Top-1 agreement is the same in both methods (the fp16
argmax is stored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from modelfactory.benchmark.perplexity import perplexity_windows, token_digest
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.records import AgreementMetrics, KldMethod, Record

FORMAT = "modelfactory.topk-logprobs/2"  # /2: the fp16 argmax is stored (top-1 without topk's tie order)
#: 256: on SmolLM2-135M (GPTQ 4-bit g128) the stored KL is then 10 % below the full KL on the mean and
#: 3 % on p99 (k=32: 26 % / 8 %), for 2 KB per position (34 MB for 16k tokens); docs/benchmarks.md.
DEFAULT_TOP_K = 256
DEFAULT_CHUNK_POSITIONS = 8192
REFERENCE_FILE = "reference.json"


# --------------------------------------------------------------------------- records
class ChunkInfo(Record):
    file: str
    positions: int


class ReferenceInfo(Record):
    """``reference.json``: what the fp16 side stored (written last, after every chunk)."""

    format: str = FORMAT
    top_k: int
    vocab_size: int
    positions: int
    #: sha256 of the scored token ids, in order (:func:`modelfactory.benchmark.perplexity.token_digest`).
    scored_tokens_sha256: str
    chunks: tuple[ChunkInfo, ...]


# --------------------------------------------------------------------------- pure math
def log_probs(logits):
    """float32 log-softmax over the vocabulary (last dim)."""
    return logits.float().log_softmax(-1)


def rest_logprob(logp, ids):
    """Log of the probability mass outside ``ids`` per row (``-inf`` when ``ids`` cover the vocabulary).

    A log-sum-exp over the remaining tokens, not ``log(1 - sum)``: exact even when the top-k hold
    nearly all the mass.
    """
    import torch

    if ids.shape[-1] == logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)


def topk_logprobs(logits, *, k: int):
    """The fp16 side's stored data for each row of ``logits [n, vocab]``: ``(ids, logp, rest_logp, argmax)``.

    ``ids`` int32 ``[n, k]`` sorted by probability (descending; the order of tied values is not
    defined), ``logp`` float32 ``[n, k]``, ``rest_logp`` float32 ``[n]`` (log of ``1 - sum(top-k P)``),
    ``argmax`` int32 ``[n]`` (:func:`top1_ids`).
    """
    import torch

    if not 1 <= k <= logits.shape[-1]:
        raise BenchmarkError(f"top_k must be between 1 and the vocabulary size {logits.shape[-1]}, got {k}")
    logp = log_probs(logits)
    top = logp.topk(k, dim=-1, sorted=True)
    return top.indices.to(torch.int32), top.values, rest_logprob(logp, top.indices), top1_ids(logits).to(torch.int32)


def top1_ids(logits):
    """Each row's most likely token: ``argmax``, the lowest id among tied maxima (ties are common in bf16
    logits; ``topk``'s order among them is not defined, so it must not decide top-1 agreement)."""
    return logits.argmax(-1)


def bucket_kl(ref_logp, ref_rest_logp, q_logp_at_ids, q_rest_logp):
    """KL(P || Q) per row over the k stored buckets plus the residual bucket, float64 ``[n]``.

    ``ref_logp [n, k]``/``ref_rest_logp [n]``: log P of the fp16 top-k and of the rest;
    ``q_logp_at_ids``/``q_rest_logp``: log Q of the same tokens and of the same rest.
    A lower bound of the full-vocabulary KL (log-sum inequality; gap = R · KL(P_tail || Q_tail)).
    Float rounding can make a KL of nearly identical distributions come out a hair below 0;
    it is clamped at 0 (KL is never negative).
    """
    import torch

    ref_logp, ref_rest, q_at, q_rest = (t.double() for t in (ref_logp, ref_rest_logp, q_logp_at_ids, q_rest_logp))
    top = (ref_logp.exp() * (ref_logp - q_at)).sum(-1)
    # 0 · log(0 / q) = 0: an empty residual bucket (k == vocab, or underflow) contributes nothing.
    rest = torch.where(torch.isneginf(ref_rest), torch.zeros_like(ref_rest),
                       ref_rest.exp() * (ref_rest - q_rest))
    return (top + rest).clamp_min(0.0)


def full_kl(ref_logits, quant_logits):
    """KL(P || Q) per row over the full vocabulary, float64 ``[n]`` (what :func:`bucket_kl` bounds from below)."""
    p_logp = log_probs(ref_logits).double()
    q_logp = log_probs(quant_logits).double()
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1).clamp_min(0.0)


def top1_agreement(ref_argmax, quant_logits):
    """Bool ``[n]``: the quantized model's most likely token is the fp16 model's (both by :func:`top1_ids`)."""
    return top1_ids(quant_logits) == ref_argmax.long()


def agreement_terms(ref_ids, ref_logp, ref_rest_logp, ref_argmax, quant_logits):
    """Per-position ``(kl float64 [n], top1 bool [n])`` of the quantized logits against the stored fp16 data
    (the KL a lower bound: :func:`bucket_kl`)."""
    q_logp = log_probs(quant_logits)
    ids = ref_ids.long()
    kl = bucket_kl(ref_logp, ref_rest_logp, q_logp.gather(-1, ids), rest_logprob(q_logp, ids))
    return kl, top1_agreement(ref_argmax, quant_logits)


def exact_terms(ref_logits, quant_logits):
    """Per-position ``(kl float64 [n], top1 bool [n])`` over the full vocabulary: :func:`full_kl` and
    :func:`top1_agreement` of the two models' logits."""
    return full_kl(ref_logits, quant_logits), top1_agreement(top1_ids(ref_logits), quant_logits)


def _quantile(sorted_values, q: float) -> float:
    """Linear-interpolation quantile of an ascending float tensor (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(kl, top1, rest_logp, *, top_k: int, vocab_size: int, method: KldMethod | None = None,
              lower_bound: AgreementMetrics | None = None) -> AgreementMetrics:
    """Mean / median / p99 / max KL, top-1 agreement % and mean residual mass over all positions.

    *method* says what *kl* is (default: the top-k buckets, exact when they cover the vocabulary); an exact
    summary carries the top-k *lower_bound* of the same run, reported next to it.
    """
    method = method or ("exact" if top_k >= vocab_size else "topk_lower_bound")
    if len(kl) == 0:
        raise BenchmarkError("no scored positions to compare: the evaluation text produced no windows")
    ordered = kl.double().sort().values
    return AgreementMetrics(
        positions=len(kl), top_k=top_k, vocab_size=vocab_size, kld_method=method,
        kld_mean=float(ordered.mean()), kld_median=_quantile(ordered, 0.5), kld_p99=_quantile(ordered, 0.99),
        kld_max=float(ordered[-1]), top1_agreement_pct=100.0 * float(top1.double().mean()),
        rest_mass_mean=float(rest_logp.double().exp().mean()),
        lower_bound_kld_mean=lower_bound.kld_mean if lower_bound else None,
        lower_bound_kld_p99=lower_bound.kld_p99 if lower_bound else None,
    )


def exact_agreement(quant_model, ref_model, *, ids: list[int], context_len: int, stride: int, device: str,
                    lower_bound: AgreementMetrics) -> AgreementMetrics:
    """Exact KL(fp16 || GPTQ) and top-1 agreement: both models score every perplexity window in this process
    (the same windows and positions as :func:`modelfactory.benchmark.perplexity.measure_perplexity` and the
    top-k reference *lower_bound* was measured on, which is checked)."""
    import torch

    kls, top1s = [], []
    pairs = zip(scored_logits(quant_model, ids, context_len=context_len, stride=stride, device=device),
                scored_logits(ref_model, ids, context_len=context_len, stride=stride, device=device), strict=True)
    for (q_logits, targets), (p_logits, _) in pairs:
        kl, top1 = exact_terms(p_logits.float(), q_logits.float())
        kls.append(kl.cpu())
        top1s.append(top1.cpu())
    kl = torch.cat(kls)
    if len(kl) != lower_bound.positions:
        raise BenchmarkError(f"the exact agreement scored {len(kl)} positions, the top-k reference "
                             f"{lower_bound.positions}: both must use the same text and windows")
    # The residual mass is the top-k reference's (what the bound's slack scales with); no such bucket here.
    return summarize(kl, torch.cat(top1s), torch.tensor([math.log(max(lower_bound.rest_mass_mean, 1e-300))]),
                     top_k=lower_bound.top_k, vocab_size=lower_bound.vocab_size, method="exact",
                     lower_bound=lower_bound)


# --------------------------------------------------------------------------- the windows
def scored_logits(model, ids: list[int], *, context_len: int, stride: int, device: str) -> Iterator[tuple]:
    """``(logits [scored, vocab], targets [scored])`` per perplexity window (the windows and positions
    :func:`modelfactory.benchmark.perplexity.measure_perplexity` scores), under ``torch.inference_mode``."""
    import torch

    tokens = torch.tensor(ids, dtype=torch.long)
    for w in perplexity_windows(len(ids), context_len=context_len, stride=stride):
        chunk = tokens[w.begin : w.end].unsqueeze(0).to(device)
        with torch.inference_mode():
            logits = model(input_ids=chunk).logits[0, -w.scored - 1 : -1]
        yield logits, chunk[0, -w.scored :]


# --------------------------------------------------------------------------- fp16 side: writer
class ReferenceWriter:
    """Stores the fp16 side's top-k log-probs, residual mass and targets in chunked safetensors files.

    Feed it window by window (:meth:`add`), then :meth:`finish` writes ``reference.json``.
    """

    def __init__(self, folder: Path, *, top_k: int = DEFAULT_TOP_K,
                 chunk_positions: int = DEFAULT_CHUNK_POSITIONS) -> None:
        if chunk_positions < 1:
            raise BenchmarkError(f"chunk_positions must be >= 1, got {chunk_positions}")
        self.folder = Path(folder)
        if (self.folder / REFERENCE_FILE).exists():
            raise BenchmarkError(f"{self.folder} already holds an fp16 reference: write into a fresh folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.top_k, self.chunk_positions = top_k, chunk_positions
        self.vocab_size: int | None = None
        self._pending: list[tuple] = []  # (ids, logp, rest_logp, argmax, targets) slices not yet in a chunk file
        self._pending_n = 0
        self._chunks: list[ChunkInfo] = []
        self._targets: list[int] = []

    def add(self, logits, targets) -> None:
        """One window: ``logits [n, vocab]`` of the scored positions and their ``targets [n]``."""
        import torch

        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise BenchmarkError(f"expected logits [n, vocab] and targets [n], got {tuple(logits.shape)} "
                                 f"and {tuple(targets.shape)}")
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        elif logits.shape[-1] != self.vocab_size:
            raise BenchmarkError(f"vocabulary size changed between windows: {self.vocab_size} -> {logits.shape[-1]}")
        ids, logp, rest, argmax = topk_logprobs(logits, k=self.top_k)
        targets = targets.to(torch.int32).cpu()
        self._pending.append((ids.cpu(), logp.cpu(), rest.cpu(), argmax.cpu(), targets))
        self._pending_n += len(targets)
        self._targets.extend(targets.tolist())
        while self._pending_n >= self.chunk_positions:
            self._flush(self.chunk_positions)

    def _flush(self, n: int) -> None:
        import torch
        from safetensors.torch import save_file

        columns = [torch.cat(parts) for parts in zip(*self._pending, strict=True)]
        head = {name: col[:n].contiguous() for name, col in zip(("ids", "logp", "rest_logp", "argmax", "targets"),
                                                                 columns, strict=True)}
        self._pending = [tuple(col[n:] for col in columns)] if len(columns[0]) > n else []
        self._pending_n -= n
        name = f"chunk-{len(self._chunks):05d}.safetensors"
        save_file(head, str(self.folder / name))
        self._chunks.append(ChunkInfo(file=name, positions=n))

    def finish(self) -> ReferenceInfo:
        if self._pending_n:
            self._flush(self._pending_n)
        if not self._chunks:
            raise BenchmarkError("the fp16 reference is empty: no window was added")
        info = ReferenceInfo(top_k=self.top_k, vocab_size=self.vocab_size, positions=len(self._targets),
                             scored_tokens_sha256=token_digest(self._targets), chunks=tuple(self._chunks))
        (self.folder / REFERENCE_FILE).write_text(info.model_dump_json(indent=2))
        return info


def write_reference(folder: Path, windows: Iterable[tuple], *, top_k: int = DEFAULT_TOP_K,
                    chunk_positions: int = DEFAULT_CHUNK_POSITIONS) -> ReferenceInfo:
    """fp16 side: store the reference of every ``(logits, targets)`` window (e.g. from :func:`scored_logits`)."""
    writer = ReferenceWriter(folder, top_k=top_k, chunk_positions=chunk_positions)
    for logits, targets in windows:
        writer.add(logits, targets)
    return writer.finish()


# --------------------------------------------------------------------------- quantized side: reader + scorer
def read_reference_info(folder: Path) -> ReferenceInfo:
    """``reference.json`` of a finished fp16 reference (clear error when missing, unfinished or foreign)."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        raise BenchmarkError(f"no finished fp16 reference in {folder} ({REFERENCE_FILE} missing): the fp16 side "
                             "must run first with distribution agreement enabled; rerun the benchmark")
    try:
        info = ReferenceInfo.model_validate(json.loads(path.read_text()))
    except ValueError as exc:
        raise BenchmarkError(f"{path} is not a valid fp16 reference ({exc}); rerun the benchmark") from exc
    if info.format != FORMAT:
        raise BenchmarkError(f"{path} has format {info.format!r}, this code reads {FORMAT!r}; rerun the benchmark")
    return info


class AgreementScorer:
    """Scores the quantized side's windows, in the fp16 side's order, against its stored reference."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.info = read_reference_info(self.folder)
        self._chunk_iter = iter(self.info.chunks)
        self._buffer: dict | None = None  # the current chunk's tensors, consumed from _offset on
        self._offset = 0
        self._seen = 0
        self._targets: list[int] = []
        self._kl, self._top1, self._rest = [], [], []

    def _take(self, n: int) -> dict:
        """The next ``n`` stored positions (across chunk boundaries)."""
        import torch
        from safetensors.torch import load_file

        parts = []
        while n:
            if self._buffer is None or self._offset == len(self._buffer["targets"]):
                chunk = next(self._chunk_iter, None)
                if chunk is None:
                    raise BenchmarkError(f"the quantized side scores more positions than the fp16 reference holds "
                                         f"({self.info.positions}): both sides must use the same text and windows")
                self._buffer, self._offset = load_file(str(self.folder / chunk.file)), 0
            m = min(n, len(self._buffer["targets"]) - self._offset)
            parts.append({k: v[self._offset : self._offset + m] for k, v in self._buffer.items()})
            self._offset += m
            n -= m
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def add(self, logits, targets) -> None:
        """One window of the quantized side: ``logits [n, vocab]`` and ``targets [n]``."""
        import torch

        if logits.shape[-1] != self.info.vocab_size:
            raise BenchmarkError(f"the quantized model's vocabulary ({logits.shape[-1]}) differs from the fp16 "
                                 f"reference's ({self.info.vocab_size}): the quantized model must keep the base's head")
        ref = self._take(len(targets))
        targets = targets.to(torch.int32).cpu()
        if not torch.equal(ref["targets"], targets):
            at = self._seen + int((ref["targets"] != targets).nonzero()[0])
            raise BenchmarkError(f"the quantized side scores different tokens than the fp16 reference from position "
                                 f"{at} on: both sides must tokenize the same text with the same tokenizer and windows")
        device = logits.device
        kl, top1 = agreement_terms(ref["ids"].to(device), ref["logp"].to(device), ref["rest_logp"].to(device),
                                   ref["argmax"].to(device), logits)
        self._kl.append(kl.cpu())
        self._top1.append(top1.cpu())
        self._rest.append(ref["rest_logp"])
        self._targets.extend(targets.tolist())
        self._seen += len(targets)

    def finish(self) -> AgreementMetrics:
        import torch

        if self._seen != self.info.positions or token_digest(self._targets) != self.info.scored_tokens_sha256:
            raise BenchmarkError(f"the quantized side scored {self._seen} positions, the fp16 reference "
                                 f"{self.info.positions} (digests differ): both sides must use the same text and windows")
        return summarize(torch.cat(self._kl), torch.cat(self._top1), torch.cat(self._rest),
                         top_k=self.info.top_k, vocab_size=self.info.vocab_size)


def score_agreement(folder: Path, windows: Iterable[tuple]) -> AgreementMetrics:
    """Quantized side: KL and top-1 agreement of every ``(logits, targets)`` window against the stored reference."""
    scorer = AgreementScorer(folder)
    for logits, targets in windows:
        scorer.add(logits, targets)
    return scorer.finish()
