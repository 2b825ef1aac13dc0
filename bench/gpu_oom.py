"""A real CUDA out-of-memory in the factory's own steps (run on the GPU machine).

A tiny Llama is quantized, then benchmarked, by the factory flow with the GPU memory of each step
capped (``MODELFACTORY_CUDA_MEMORY_FRACTION``) below what it needs. Writes ``--out/gpu-oom.json``:
the error type and message each time, whether it is transient (it must not be), the catalog's
record of the run, and how many times the step ran (once: not retried).

    python3 bench/gpu_oom.py --tokenizer /root/keep/tok32k --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_model(out: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(out)
    for file in tokenizer.iterdir():
        shutil.copy2(file, out / file.name)
    return out


def attempt(spec: dict, fraction: float) -> dict:
    from modelfactory.catalog import open_catalog
    from modelfactory.core.errors import is_transient
    from modelfactory.interfaces.runner import run_factory
    from modelfactory.testing.env import settings_env

    started = time.perf_counter()
    try:
        with settings_env(MODELFACTORY_CUDA_MEMORY_FRACTION=str(fraction)):
            outcome = run_factory(spec)
        result = {"status": outcome.status}
    except Exception as exc:  # noqa: BLE001 - recorded
        result = {"error_type": type(exc).__name__, "message": str(exc), "transient": is_transient(exc)}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (run,) = open_catalog().list_runs(limit=1)
    detail = open_catalog().get_run(run.id)
    result["catalog"] = {"status": detail.status, "error_kind": detail.error_kind,
                         "steps": {s.name: s.status for s in detail.steps}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    model = make_model(Path(os.environ.get("MODELFACTORY_HOME", "/root/mfhome")) / "oom-llama", args.tokenizer)
    total = torch.cuda.get_device_properties(0).total_memory
    spec = {"name": "oom", "base": {"uri": str(model)},
            "quantize": {"bits": 4, "group_size": 128, "calibration": {"num_samples": 8, "seq_len": 256}},
            "benchmark": {"device": "cuda", "perplexity": {"max_tokens": 2048}, "decode": {"new_tokens": 16}}}
    report = {"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "model_fp16_bytes": sum(
        f.stat().st_size for f in model.glob("*.safetensors")), "gpu_total_bytes": total, "attempts": {}}
    # Quantize capped at 8 MiB: one decoder layer (26 MB fp16) does not fit.
    report["attempts"]["quantize_capped_8MiB"] = attempt(spec, (8 << 20) / total)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-oom.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
