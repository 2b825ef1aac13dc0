"""The benchmark harness's arithmetic, and perplexity on a real (tiny) model against a reference."""

from __future__ import annotations

import math

import pytest

from modelfactory.benchmark.decode import decode_rate
from modelfactory.benchmark.kernels import choose_kernel
from modelfactory.benchmark.memory import disk_bytes
from modelfactory.benchmark.perplexity import (
    measure_perplexity,
    perplexity_from_nll,
    perplexity_windows,
    token_digest,
)


def _scored_positions(windows) -> list[int]:
    return [pos for w in windows for pos in range(w.end - w.scored, w.end)]


# --------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n", [2, 3, 10, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("context_len,stride", [(8, 8), (8, 4), (8, 1), (8, 7), (32, 16), (16, 5)])
def test_windows_never_score_a_token_twice(n, context_len, stride):
    windows = perplexity_windows(n, context_len=context_len, stride=stride)
    positions = _scored_positions(windows)
    assert len(positions) == len(set(positions))
    assert all(1 <= p < n for p in positions)  # token 0 has no context: never scored
    for w in windows:
        assert 0 <= w.begin < w.end <= n
        assert w.end - w.begin <= context_len
        assert 1 <= w.scored <= w.end - w.begin - 1
    if stride < context_len:  # overlapping: every token but the first scored exactly once
        assert sorted(positions) == list(range(1, n))
        # each scored token sees at least context_len - stride tokens before it in its window
        for w in windows[1:]:
            assert w.end - w.scored - w.begin >= min(context_len - stride, w.end - w.begin - 1)


def test_disjoint_windows():
    windows = perplexity_windows(20, context_len=8, stride=8)
    assert [(w.begin, w.end, w.scored) for w in windows] == [(0, 8, 7), (8, 16, 7), (16, 20, 3)]
    assert sum(w.scored for w in windows) == 20 - 3  # each window's first token is unscored


def test_overlapping_windows():
    windows = perplexity_windows(20, context_len=8, stride=4)
    assert [(w.begin, w.end, w.scored) for w in windows] == [(0, 8, 7), (4, 12, 4), (8, 16, 4), (12, 20, 4)]
    assert sum(w.scored for w in windows) == 19


def test_windows_of_too_few_tokens():
    assert perplexity_windows(0, context_len=8, stride=8) == []
    assert perplexity_windows(1, context_len=8, stride=4) == []
    assert [(w.begin, w.end, w.scored) for w in perplexity_windows(2, context_len=8, stride=4)] == [(0, 2, 1)]


# --------------------------------------------------------------------------- small formulas
def test_perplexity_from_nll():
    assert perplexity_from_nll(total_nll=0.0, n_scored=10) == 1.0
    assert perplexity_from_nll(total_nll=10 * math.log(50.0), n_scored=10) == pytest.approx(50.0)
    # uniform guess over a vocabulary of V tokens: ppl == V
    assert perplexity_from_nll(total_nll=7 * math.log(49152), n_scored=7) == pytest.approx(49152)


def test_decode_rate_excludes_prefill():
    # 1 token in 0.1 s (prefill + first), 11 tokens in 1.1 s: 10 decode tokens in 1.0 s
    assert decode_rate(t_first=0.1, t_all=1.1, new_tokens=11) == pytest.approx(10.0)
    assert decode_rate(t_first=0.5, t_all=2.5, new_tokens=65) == pytest.approx(32.0)
    # An interval that is not positive (a coarse clock, a tiny model) is not measured: no 1e-9 clamp, no 3e9 tok/s.
    assert decode_rate(t_first=1.0, t_all=1.0, new_tokens=8) is None
    assert decode_rate(t_first=1.0, t_all=0.9, new_tokens=8) is None


def test_decode_rate_counts_every_sequence_of_a_batch():
    # 8 sequences, 11 tokens each in 1.1 s, the first in 0.1 s: 8 * 10 decode tokens in 1.0 s
    assert decode_rate(t_first=0.1, t_all=1.1, new_tokens=11, batch=8) == pytest.approx(80.0)
    assert decode_rate(t_first=0.1, t_all=1.1, new_tokens=11, batch=1) == decode_rate(t_first=0.1, t_all=1.1,
                                                                                     new_tokens=11)


def test_token_digest():
    assert token_digest([1, 2, 3]) == token_digest([1, 2, 3])
    assert token_digest([1, 2, 3]) != token_digest([1, 23])
    assert token_digest([12, 3]) != token_digest([1, 23])


@pytest.mark.parametrize(
    "requested,device,group,widths,expected",
    [
        ("auto", "cpu", 128, [576, 1536], "gptq_torch"),  # SmolLM2: 576 % 128 != 0
        ("auto", "cpu", 128, [512, 1536], "auto"),
        ("auto", "cpu", 32, [576, 1536], "auto"),
        ("auto", "cpu", -1, [576], "auto"),
        ("gptq_marlin", "cpu", 128, [576], "gptq_marlin"),
        ("gptq_torch", "cuda", 128, [512], "gptq_torch"),
        ("auto", "cuda", 128, [576, 1536], "gptq_triton"),  # Marlin needs multiples of 128
        ("auto", "cuda", 128, [4096, 11008], "gptq_marlin"),  # not GPTQModel's auto (Machete: downloads CUTLASS)
        ("auto", "cuda", -1, [4096], "gptq_marlin"),
    ],
)
def test_choose_kernel(requested, device, group, widths, expected):
    assert choose_kernel(requested, device=device, group_size=group, in_features=widths) == expected


def test_disk_bytes_counts_only_safetensors(tmp_path):
    assert disk_bytes(tmp_path) == 0
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 234)
    (tmp_path / "config.json").write_text("{}" * 50)
    (tmp_path / "tokenizer.json").write_bytes(b"y" * 5000)
    assert disk_bytes(tmp_path) == 1234


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def fp32_model(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def eval_ids(tiny_llama):
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    text = (Path(os.environ["MODELFACTORY_DATA_DIR"]) / "wikitext-2-raw-v1" / "test.txt").read_text()[:2000]
    ids = AutoTokenizer.from_pretrained(tiny_llama)(text, add_special_tokens=False)["input_ids"][:101]
    assert len(ids) == 101
    return ids


def reference_perplexity(model, ids: list[int], context_len: int, stride: int) -> tuple[float, int]:
    """The Hugging Face sliding-window recipe, with the model's own shifted loss on masked labels."""
    import torch

    input_ids = torch.tensor([ids])
    n = len(ids)
    total_nll, total_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + context_len, n)
            window = input_ids[:, begin:end]
            labels = window.clone()
            labels[:, : -(end - prev_end)] = -100  # context only
            counted = int((labels[:, 1:] != -100).sum())  # the loss shifts labels by one
            loss = model(input_ids=window, labels=labels).loss
            total_nll += float(loss) * counted
            total_tokens += counted
            prev_end = end
            if end == n:
                break
    return math.exp(total_nll / total_tokens), total_tokens


@pytest.mark.parametrize("context_len,stride", [(32, 32), (32, 8), (40, 25)])
def test_measure_perplexity_matches_reference(fp32_model, eval_ids, context_len, stride):
    got = measure_perplexity(fp32_model, ids=eval_ids, context_len=context_len, stride=stride, device="cpu")
    want, scored = reference_perplexity(fp32_model, eval_ids, context_len, stride)
    assert scored == sum(w.scored for w in perplexity_windows(len(eval_ids), context_len=context_len, stride=stride))
    assert got == pytest.approx(want, rel=1e-4)
    # A random 2-layer model is close to a uniform guess over its 49152-token vocabulary.
    assert 1_000 < got < 1_000_000


def test_perplexity_window_hook_sees_every_scored_logit(fp32_model, eval_ids):
    """The per-window hook (where a side writes or compares per-window outputs) gets each window's
    logits at its scored positions and their targets, and the NLL they give is the perplexity's."""
    import torch

    seen = []
    ppl = measure_perplexity(fp32_model, ids=eval_ids, context_len=40, stride=25, device="cpu",
                             on_window=lambda i, w, logits, targets: seen.append((i, w, logits.clone(), targets)))
    windows = perplexity_windows(len(eval_ids), context_len=40, stride=25)
    assert [(i, w) for i, w, _, _ in seen] == list(enumerate(windows))
    for _, w, logits, targets in seen:
        assert logits.shape == (w.scored, 49152) and logits.dtype == torch.float32
        assert targets.tolist() == eval_ids[w.end - w.scored : w.end]
    nll = sum(float(torch.nn.functional.cross_entropy(l, t, reduction="sum")) for _, _, l, t in seen)
    assert ppl == pytest.approx(perplexity_from_nll(total_nll=nll, n_scored=sum(w.scored for w in windows)))


def test_eager_decode_of_a_batch_repeats_the_greedy_sequence(fp32_model):
    """Batch B decode: B copies of the prompt, every sequence the batch-1 greedy one, tok/s over all B."""
    import torch

    from modelfactory.benchmark.decode import batch_prompt, measure_decode

    prompt = torch.tensor([[1, 400, 2500, 77]])
    assert batch_prompt(prompt, 3).shape == (3, 4) and (batch_prompt(prompt, 3) == prompt).all()
    _, rate1, one = measure_decode(fp32_model, input_ids=prompt, new_tokens=6, warmup=0, repeats=1, device="cpu")
    _, rate4, four = measure_decode(fp32_model, input_ids=batch_prompt(prompt, 4), new_tokens=6, warmup=0,
                                    repeats=1, device="cpu")
    assert one.shape == (1, 10) and four.shape == (4, 10)
    assert (four == one).all()
    assert rate1 > 0 and rate4 > 0
