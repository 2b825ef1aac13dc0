"""How much of a GPU stage is compile: the same stage with an empty, then a warm compile cache.

On the GPU machine (repo root, after ``source bench/gpu_env.sh``)::

    python bench/compile_cache.py --shape llama-1.1b --out bench/results
    python bench/compile_cache.py --model-dir DIR --spec stage.yaml --out DIR

A pass is the GPU stage as a factory run does it (``flows/gpu_stage.py``): ``modelfactory.tasks.quantize.quantize_model``
then ``modelfactory.tasks.benchmark.benchmark_models``, each side in its own isolated step process with the
environment of ``modelfactory.core.devices.gpu_env()``. Each pass runs in a fresh Python process with
``MODELFACTORY_CACHE_DIR=<root>/cache`` (every compile cache of ``modelfactory.core.caches`` under it)
and an empty work dir of its own, so no step output is reused, only compiled code:

- cold: the cache dir emptied first (a fresh host: Marlin JIT, Inductor/Triton, ...);
- warm: the cache pass 1 left (every later run on that host).

``compile_s = cold_s - warm_s`` is what the caches save per stage; ``warm_s`` is the stage's
measurement (and quantization) time. Prints and writes one JSON (keys ``gpu``, ``model``,
``command``, ``cold_s``, ``warm_s``, ``compile_s``, the per-step split of each pass and the bytes
each cache holds) to ``--out/<model>-gpu-stage-compile-cache.json``; the passes' output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "COMPILE_CACHE_PASS "
#: Random-weight Llama shapes (the model's values do not change compile or kernel time).
SHAPES = {
    "llama-1.1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096},
    "llama-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096},
}


def split(cold: dict, warm: dict) -> dict:
    """Compile vs the rest, from a cold and a warm pass (each ``{"stage_s", "quantize_step_s",
    "benchmark_step_s", "load_s": {"fp16", "gptq"}}``): what the warm cache saves, in total and per part."""
    compile_s = cold["stage_s"] - warm["stage_s"]
    return {
        "cold_s": cold["stage_s"],
        "warm_s": warm["stage_s"],
        "compile_s": compile_s,
        "compile_fraction_of_cold": compile_s / cold["stage_s"] if cold["stage_s"] > 0 else None,
        "compile_s_by_part": {
            "quantize_step": cold["quantize_step_s"] - warm["quantize_step_s"],
            "benchmark_step": cold["benchmark_step_s"] - warm["benchmark_step_s"],
            **{f"load_{side}": cold["load_s"][side] - warm["load_s"][side] for side in cold["load_s"]},
        },
    }


# --------------------------------------------------------------------------- one pass (child process)
def run_pass(model_dir: str, spec: dict) -> dict:
    """The GPU stage once, with this process's MODELFACTORY_CACHE_DIR / MODELFACTORY_WORK_DIR."""
    from modelfactory.core.caches import compile_cache_env
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.settings import get_settings
    from modelfactory.core.specs import BenchmarkSpec, QuantSpec
    from modelfactory.tasks.benchmark import benchmark_models
    from modelfactory.tasks.quantize import quantize_model

    qspec = QuantSpec.model_validate(spec.get("quantize", {}))
    bspec = BenchmarkSpec.model_validate(spec.get("benchmark", {}))
    base = ModelArtifact(path=model_dir, sha=f"compile-cache-bench:{Path(model_dir).name}", source_uri=model_dir,
                         kind="local")
    start = time.perf_counter()
    quant = quantize_model(model=base, spec=qspec, device=bspec.device)
    quantized = time.perf_counter()
    result = benchmark_models(baseline=base, candidate=quant.model, spec=bspec)
    end = time.perf_counter()
    assert not quant.model.reused and not result.reused, "a pass must not reuse step outputs (fresh work dir)"
    return {
        "stage_s": end - start,
        "quantize_step_s": quantized - start,
        "quantize_s": quant.quantize_s,
        "benchmark_step_s": end - quantized,
        "load_s": {"fp16": result.fp16.load_s, "gptq": result.gptq.load_s},
        "decode_tok_s": {"fp16": result.fp16.decode_tok_s, "gptq": result.gptq.decode_tok_s},
        "decode_mode": {"fp16": result.fp16.decode_mode, "gptq": result.gptq.decode_mode},
        "kernel": result.gptq.kernel,
        "device": result.gptq.device,
        "caches": compile_cache_env(get_settings().resolved_cache_dir),
        "quant_spec": qspec.model_dump(mode="json"),
        "benchmark_spec": bspec.model_dump(mode="json"),
    }


def make_model(shape: str, tokenizer: str, out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16)
    tmp = Path(out + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for file in Path(tokenizer).iterdir():
        shutil.copy2(file, tmp / file.name)
    tmp.rename(out)


# --------------------------------------------------------------------------- driver
def _child(args: list[str], env: dict[str, str]) -> dict | None:
    """Run this script with *args* in a fresh process; its output to stderr; its result line, if any."""
    from modelfactory.core.caches import COMPILE_CACHES

    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    # a shell that sourced bench/gpu_env.sh exports the host's caches: the pass must see only its own
    base = {k: v for k, v in os.environ.items() if k not in COMPILE_CACHES}
    result = None
    with subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
            else:
                print(line, end="", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"compile_cache.py: `{' '.join(cmd)}` exited with code {proc.returncode}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="an fp16 model folder (else a random --shape is made once under --root)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1.1b")
    parser.add_argument("--tokenizer", default="/root/keep/tok32k", help="tokenizer folder for a made model")
    parser.add_argument("--spec", type=Path, help="YAML/JSON with optional `quantize:` and `benchmark:` "
                                                  "(QuantSpec / BenchmarkSpec fields; default: the factory's)")
    parser.add_argument("--root", type=Path, help="scratch (default: $MODELFACTORY_HOME/compile-cache-bench)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    parser.add_argument("--child", choices=("pass", "make"), help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "pass":
        print(RESULT_PREFIX + json.dumps(run_pass(args.model_dir, json.loads(args.child_spec))), flush=True)
        return 0
    if args.child == "make":
        make_model(args.shape, args.tokenizer, args.model_dir)
        return 0

    from modelfactory.core.caches import cache_sizes
    from modelfactory.core.settings import get_settings

    root = (args.root or get_settings().home / "compile-cache-bench").absolute()
    root.mkdir(parents=True, exist_ok=True)
    spec: dict = {}
    if args.spec:
        import yaml

        spec = yaml.safe_load(args.spec.read_text()) or {}
    if args.model_dir:
        model_dir, model = str(Path(args.model_dir).absolute()), Path(args.model_dir).name
    else:
        model_dir, model = str(root / f"{args.shape}-random-fp16"), f"{args.shape} shape, random weights"
        if not (Path(model_dir) / "config.json").is_file():
            _child(["--child", "make", "--shape", args.shape, "--tokenizer", args.tokenizer, "--model-dir", model_dir], {})

    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold: nothing compiled yet
    passes, sizes = {}, {}
    for label in ("cold", "warm"):
        work = root / f"work-{label}"
        shutil.rmtree(work, ignore_errors=True)  # no step output may be reused, only compiled code
        print(f"compile_cache.py: {label} pass (MODELFACTORY_CACHE_DIR={cache}, MODELFACTORY_WORK_DIR={work})",
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        passes[label] = _child(["--child", "pass", "--child-spec", json.dumps(spec), "--model-dir", model_dir],
                               {"MODELFACTORY_CACHE_DIR": str(cache), "MODELFACTORY_WORK_DIR": str(work)})
        passes[label]["process_s"] = time.perf_counter() - start
        sizes[label] = cache_sizes(cache)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "gpu": passes["cold"]["device"],  # the benchmark's device name (the GPU's, or "cpu")
        "model": model,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **split(passes["cold"], passes["warm"]),
        "cache_bytes_after_cold": sizes["cold"],
        "cache_bytes_added_by_warm": {k: sizes["warm"][k] - sizes["cold"][k] for k in sizes["cold"]},
        "passes": passes,
        "what": "GPU stage (quantize_model + benchmark_models, as flows/gpu_stage.py) with an empty, then a warm "
                "MODELFACTORY_CACHE_DIR; fresh work dir per pass; compile_s = cold_s - warm_s",
    }
    slug = (Path(args.model_dir).name if args.model_dir else args.shape).replace("_", "-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{slug}-gpu-stage-compile-cache.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("gpu", "model", "command", "cold_s", "warm_s", "compile_s",
                                             "compile_fraction_of_cold", "compile_s_by_part")}, indent=2))
    print(f"compile_cache.py: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
