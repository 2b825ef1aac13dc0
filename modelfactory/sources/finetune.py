"""A short LoRA fine-tune, so the demo has a real adapter to merge (CPU-friendly).

Not a factory step: real users bring their adapters. The output is keyed like a step
(base SHA + spec) and reused on the next demo run.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from modelfactory.core import workdir
from modelfactory.core.hashing import step_key
from modelfactory.core.log import progress
from modelfactory.core.specs import Spec, TextSource
from modelfactory.sources.text import load_text, require_tokens


def _train_text() -> TextSource:
    return TextSource(dataset="wikitext", config="wikitext-2-v1", split="validation")


class LoraTrainSpec(Spec):
    text: TextSource = Field(default_factory=_train_text)
    rank: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = Field(default=24, ge=1, le=10_000)
    batch_size: int = Field(default=2, ge=1)
    seq_len: int = Field(default=128, ge=8)
    learning_rate: float = Field(default=1e-3, gt=0)
    seed: int = 0


def train_lora(*, base_path: str, base_sha: str, spec: LoraTrainSpec) -> tuple[Path, bool]:
    """Train (or reuse) a LoRA adapter on *base_path*; returns ``(adapter_dir, reused)``."""
    key = step_key("finetune", base=base_sha, spec=spec)
    done = workdir.completed("finetune", key)
    if done is not None:
        progress(f"finetune: reusing adapter {done}")
        return done, True
    with workdir.building("finetune", key) as (tmp, marker):
        losses = _train(base_path, tmp, spec)
        marker.update(base_sha=base_sha, losses=losses)
    return workdir.step_dir("finetune", key), False


def _train(base_path: str, out_dir: Path, spec: LoraTrainSpec) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    text, origin = load_text(spec.text)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    require_tokens(ids.numel(), spec.seq_len + 1, what="fine-tune", label=origin)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=spec.learning_rate)
    generator = torch.Generator().manual_seed(spec.seed)
    losses: list[float] = []
    start = last = time.perf_counter()
    progress(f"finetune: LoRA r={spec.rank} on {list(spec.target_modules)}, {spec.steps} steps on {origin}")
    for step in range(spec.steps):
        offsets = torch.randint(0, ids.numel() - spec.seq_len, (spec.batch_size,), generator=generator)
        batch = torch.stack([ids[o : o + spec.seq_len] for o in offsets.tolist()])
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())
        if time.perf_counter() - last > 10 or step == spec.steps - 1:
            progress(f"finetune: step {step + 1}/{spec.steps} loss {losses[-1]:.3f}")
            last = time.perf_counter()
    peft_model.save_pretrained(out_dir)
    progress(f"finetune: done in {time.perf_counter() - start:.0f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    return losses
