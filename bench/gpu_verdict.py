"""The verdict on a bare, offline GPU machine: first GPTQ load cold vs warm, then `modelfactory run` as a user runs it.

On the GPU machine, after ``source bench/gpu_env.sh`` (repo root; no network there)::

    python bench/gpu_verdict.py first-load        # cold (empty cache: Marlin JIT) vs warm first GPTQ load,
                                                  # with `modelfactory kernels prepare` in between
    python bench/gpu_verdict.py make-7b           # the random-weight Llama-2-7B shape (no download)
    python bench/gpu_verdict.py run NAME -- ARGS  # `modelfactory run ARGS --format json`, timed, kept as NAME
    python bench/gpu_verdict.py report --out DIR  # one JSON per run: gpu, model, gate_passed, steps, ...

Each stage writes its part under ``$MODELFACTORY_HOME/gpu-verdict/`` (the machine keeps it between calls
while it stays warm); ``report`` joins them into ``<model>-offline-verdict-<gpu>.json`` with the keys
``gpu``, ``model``, ``gate_passed``, ``gate``, ``first_gptq_load_s_cold``, ``first_gptq_load_s_warm``,
``decode_speedup_by_batch``, ``verified_loading_paths``, ``steps`` and ``command``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: A fresh process loading a small GPTQ checkpoint with Marlin and running one forward: a worker's first
#: GPTQ load (the kernel's JIT build included when the cache is cold).
#: The modelfactory command, by this interpreter (a console script may carry another Python's shebang).
MODELFACTORY = [sys.executable, "-c", "from modelfactory.interfaces.cli.main import main; main()"]

FIRST_LOAD = """
import sys, time, torch
from transformers import AutoModelForCausalLM, GPTQConfig
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cuda",
                                             quantization_config=GPTQConfig(bits=4, backend="gptq_marlin"))
with torch.inference_mode():
    model(input_ids=torch.tensor([[1, 2, 3, 4]], device="cuda"))
torch.cuda.synchronize()
print("FIRST_LOAD_S", time.perf_counter() - start, type(next(m for m in model.modules()
      if any(c.__name__ == "BaseQuantLinear" for c in type(m).__mro__))).__name__)
"""


def _home() -> Path:
    path = Path(os.environ.get("MODELFACTORY_HOME", "/root/mfhome")) / "gpu-verdict"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name()


def _first_load(model_dir: Path) -> tuple[float, float, str]:
    """``(process wall s, load + forward s, kernel)`` of one fresh-process GPTQ load."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FIRST_LOAD, str(model_dir)], capture_output=True, text=True,
                          check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("FIRST_LOAD_S"))
    _, seconds, kernel = line.split()
    return time.perf_counter() - start, float(seconds), kernel


def stage_first_load(args) -> None:
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import QuantSpec
    from modelfactory.tasks.quantize import quantize_model

    sys.path.insert(0, str(Path(__file__).parent))
    from compile_cache import make_model  # noqa: E402 - bench/ scripts import each other by path

    small = _home() / "small-llama"
    if not small.exists():
        SHAPE = "llama-1.1b"  # any shape: a kernel's build does not depend on it
        make_model(SHAPE, args.tokenizer, str(small))
    quant = quantize_model(model=ModelArtifact(path=str(small), sha="gpu-verdict-small", source_uri=str(small),
                                               kind="local"),
                           spec=QuantSpec.model_validate({"calibration": {"num_samples": 8, "seq_len": 128}}))
    artifact = Path(quant.model.path)
    cold = _first_load(artifact)
    print(f"[verdict] first GPTQ load, empty cache: {cold[0]:.1f} s ({cold[2]})", flush=True)
    start = time.perf_counter()
    prepared = subprocess.run([*MODELFACTORY, "kernels", "prepare", "--kernel", "marlin_fp16", "--kernel", "machete",
                               "--format", "json"], capture_output=True, text=True, check=False)
    prepare_s = time.perf_counter() - start
    print(f"[verdict] modelfactory kernels prepare: {prepare_s:.1f} s, rc {prepared.returncode}\n{prepared.stdout}",
          flush=True)
    warm = _first_load(artifact)
    print(f"[verdict] first GPTQ load, prepared cache: {warm[0]:.1f} s ({warm[2]})", flush=True)
    (_home() / "first-load.json").write_text(json.dumps({
        "first_gptq_load_s_cold": cold[0], "first_gptq_load_s_warm": warm[0],
        "first_gptq_load_inner_s": {"cold": cold[1], "warm": warm[1]}, "kernel": warm[2],
        "kernels_prepare": {"wall_s": prepare_s, "rc": prepared.returncode,
                            "builds": json.loads(prepared.stdout) if prepared.stdout.strip().startswith("[") else None},
        "what": "a fresh process loading a small GPTQ checkpoint with Marlin + one forward: first with an empty "
                "MODELFACTORY_CACHE_DIR (Marlin's JIT build inside), then after `modelfactory kernels prepare`",
    }, indent=2))


def stage_make_7b(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from compile_cache import make_model  # noqa: E402

    out = _home() / "llama2-7b-shape"
    if not out.exists():
        start = time.perf_counter()
        make_model("llama-7b", args.tokenizer, str(out))
        print(f"[verdict] 7B shape made in {time.perf_counter() - start:.0f} s: {out}", flush=True)


def stage_run(args) -> None:
    cmd = [*MODELFACTORY, "run", *args.rest, "--format", "json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    print(done.stderr[-6000:], flush=True)
    detail = None
    try:
        detail = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        print(done.stdout[-4000:], flush=True)
    (_home() / f"run-{args.name}.json").write_text(json.dumps({
        "command": " ".join(shlex.quote(c) for c in cmd), "rc": done.returncode, "wall_s": wall, "detail": detail,
    }, indent=2))
    print(f"[verdict] {args.name}: rc {done.returncode} in {wall:.0f} s", flush=True)


def _metric(detail: dict, name: str, side: str) -> float | None:
    return next((m["value"] for m in detail.get("metrics", []) if m["name"] == name and m["side"] == side), None)


def stage_report(args) -> None:
    first = json.loads((_home() / "first-load.json").read_text()) if (_home() / "first-load.json").is_file() else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(_home().glob("run-*.json")):
        run = json.loads(path.read_text())
        detail = run["detail"] or {}
        steps = {s["name"]: s.get("duration_s") for s in detail.get("steps", [])}
        runnability = next((s.get("detail") or {} for s in detail.get("steps", []) if s["name"] == "runnability"), {})
        verified = {}
        for entry in runnability.get("results") or []:
            if entry.get("ok"):
                verified.setdefault(entry["device"], {"path": entry.get("path"), "kernel": entry.get("kernel"),
                                                      "top1_agreement_pct": entry.get("top1_agreement_pct")})
        failed_defaults = [{"device": e["device"], "error": e.get("error"), "advice": e.get("advice")}
                           for e in runnability.get("results") or [] if not e.get("ok")]
        speedups = {str(b): _metric(detail, "decode_speedup" if b == 1 else f"decode_speedup_b{b}", "delta")
                    for b in (1, 8, 32)}
        name = path.stem.removeprefix("run-")
        result = {
            "gpu": _gpu(), "model": name, "command": run["command"], "rc": run["rc"], "wall_s": run["wall_s"],
            "status": detail.get("status"), "gate_passed": detail.get("status") == "passed",
            "gate_spec": (detail.get("spec") or {}).get("gate"),
            "gate": [{k: c.get(k) for k in ("metric", "threshold", "observed", "passed", "message")}
                     for c in detail.get("gate_checks", [])], "steps": steps,
            "first_gptq_load_s_cold": first.get("first_gptq_load_s_cold"),
            "first_gptq_load_s_warm": first.get("first_gptq_load_s_warm"), "first_load": first,
            "decode_speedup_by_batch": speedups, "verified_loading_paths": verified,
            "default_path_failures": failed_defaults,
            "metrics": {m["name"] + ("" if m["side"] in ("", "delta") else f"[{m['side']}]"): m["value"]
                        for m in detail.get("metrics", [])},
        }
        target = out / f"{name}-offline-verdict-{_gpu().split()[-1].lower()}.json"
        target.write_text(json.dumps(result, indent=2))
        print(f"[verdict] {target}: status {result['status']}, steps {steps}, speed-ups {speedups}, "
              f"verified {verified}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("first-load", "make-7b", "run", "report"))
    parser.add_argument("name", nargs="?", help="run: the run's name in the report")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="run: modelfactory run's arguments (after --)")
    parser.add_argument("--tokenizer", default=".gpu/tok32k")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    args.rest = [a for a in args.rest if a != "--"]
    globals()["stage_" + args.stage.replace("-", "_")](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
