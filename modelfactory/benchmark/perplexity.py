"""Perplexity: sliding windows over one token sequence, NLL summed over the scored tokens.

The evaluation text is tokenized once (no special tokens), cut to ``max_tokens``, and scored in
windows of ``context_len`` tokens moved by ``stride``; with a stride below the context, only the
last ``stride`` tokens of a window are scored (the HF "sliding window" method); no token is scored
twice (see :func:`perplexity_windows`). ppl = exp(mean NLL over the scored tokens). The sha256 of
the scored token ids (:func:`token_digest`) is recorded, proving both sides saw the same tokens.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelfactory.core.errors import BenchmarkError
from modelfactory.core.log import progress
from modelfactory.core.records import SideMetrics

#: Seconds between progress lines while scoring windows.
_REPORT_EVERY_S = 10


@dataclass(frozen=True, slots=True)
class Window:
    begin: int
    end: int
    scored: int  # the last `scored` tokens of [begin, end) are predicted and counted


#: Called for every window as ``hook(index, window, logits, targets)``: *logits* the float32 logits
#: predicting the window's scored tokens (``(scored, vocab)``, on the model's device), *targets* those
#: tokens' ids (``(scored,)``). Where a side writes (fp16) or compares (GPTQ) per-window outputs, e.g.
#: the reference distributions of a KL divergence (``modelfactory.tasks.benchmark.window_outputs``).
WindowHook = Callable[[int, "Window", Any, Any], None]


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


def perplexity_from_nll(*, total_nll: float, n_scored: int) -> float:
    return math.exp(total_nll / n_scored)


def token_digest(ids: list[int]) -> str:
    """sha256 of the token ids: equal on both sides exactly when they scored the same tokens."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def check_same_tokens(*, fp16: SideMetrics, gptq: SideMetrics) -> None:
    """Raise :class:`BenchmarkError` unless both sides scored the same token ids (their perplexities
    are comparable only then)."""
    if fp16.ppl_tokens_sha256 != gptq.ppl_tokens_sha256:
        raise BenchmarkError("fp16 and GPTQ sides scored different tokens (tokenizers differ?): "
                             "the quantized model must keep the baseline's tokenizer")


def measure_perplexity(model, *, ids: list[int], context_len: int, stride: int, device: str,
                       on_window: WindowHook | None = None) -> float:
    """Perplexity of *model* over *ids* (see the module docstring for the method); *on_window* sees
    every window's scored logits (:data:`WindowHook`)."""
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
            if on_window is not None:
                on_window(i, w, logits, targets)
            n_scored += w.scored
            if time.perf_counter() - last_report > _REPORT_EVERY_S:
                progress(f"benchmark: perplexity window {i + 1}/{len(windows)}")
                last_report = time.perf_counter()
    return perplexity_from_nll(total_nll=total_nll, n_scored=n_scored)
