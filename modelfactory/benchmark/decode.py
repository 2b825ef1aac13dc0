"""Eager decode: the timed HF ``generate`` used on CPU, and the reference every graph is checked against.

Greedy, B copies of the prompt (batch B; ``benchmark.decode.batch_sizes``), after ``warmup``
untimed runs; the rate is ``B * (N - 1) / (t_N - t_1)`` with medians over ``repeats``: the
steady decode rate of all B sequences together, without the prefill (:func:`decode_rate`);
``ttft_ms`` is the median t_1 (prefill + first token) at batch 1. An interval that is not positive
(a clock too coarse for a tiny model) is *not measured* (``None``), never a number.
"""

from __future__ import annotations

import statistics
import time


def decode_rate(*, t_first: float, t_all: float, new_tokens: int, batch: int = 1) -> float | None:
    """Tokens per second of the decode phase over all *batch* sequences, prefill excluded; ``None`` (not
    measured) when the decode interval is not positive."""
    interval = t_all - t_first
    if not interval > 0:
        return None
    return batch * (new_tokens - 1) / interval


def median_decode(*, firsts: list[float], alls: list[float], new_tokens: int, batch: int = 1,
                  ) -> tuple[float, float | None]:
    """``(ttft_s, decode_tok_s)`` from the timed runs: medians of t_1 and t_N, then :func:`decode_rate`."""
    t_first, t_all = statistics.median(firsts), statistics.median(alls)
    return t_first, decode_rate(t_first=t_first, t_all=t_all, new_tokens=new_tokens, batch=batch)


def batch_prompt(input_ids, batch: int):
    """*batch* copies of the one prompt ``input_ids`` (shape ``(1, L)``): equal lengths, so no padding."""
    return input_ids.expand(batch, -1).contiguous()


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


def measure_decode(model, *, input_ids, new_tokens: int, warmup: int, repeats: int, device: str):
    """Timed HF ``generate`` of the batch *input_ids* (``(B, L)``, see :func:`batch_prompt`):
    ``(ttft_s, decode_tok_s, output_ids)``, tok/s over all B sequences (method: the module docstring)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            _timed_generate(model, input_ids, new_tokens, device)
        firsts, alls, out = [], [], None
        for _ in range(repeats):
            firsts.append(_timed_generate(model, input_ids, 1, device)[0])
            elapsed, out = _timed_generate(model, input_ids, new_tokens, device)
            alls.append(elapsed)
    ttft_s, tok_s = median_decode(firsts=firsts, alls=alls, new_tokens=new_tokens, batch=input_ids.shape[0])
    return ttft_s, tok_s, out


def reference_decode(model, *, input_ids, steps: int):
    """Eager greedy decode over a StaticCache (no graph, no compile): ``(tokens, logits)``.

    ``tokens[i]`` is the i-th generated token (``tokens[0]`` from the prefill), ``logits[i]`` the
    float32 logits it was chosen from (on the CPU). The reference every decode-step treatment is
    checked against (:meth:`modelfactory.benchmark.graph.GraphDecoder.check`).
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
