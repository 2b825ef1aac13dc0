"""Issue 27's GPU rows: what GPTQModel's quality levers cost in quantize time on the 7B shape, on one GPU.

On the GPU machine (repo root, after ``source bench/gpu_env.sh``), with a 7B-shape model folder (e.g. the one
bench/webhook_sweep.py made)::

    python3 bench/levers_gpu.py --model /root/webhook-sweep/model-v1 --configs default,mse2.4,gptaq --out $OUT

Each row is the factory's quantize step (``modelfactory.tasks.quantize.quantize_model``: its own process, the
calibration of the spec) with the levers of the row, nothing else on the GPU: GPTQModel's own time (load +
quantize), the step's wall time, and whether every ``g_idx`` stays in column order (then the checkpoint
loads into the same kernels at the same decode speed as the default's: the levers change the weights, not
the kernel path; ``desc_act``, which does change it, is timed by bench/webhook_sweep.py's sweep). One JSON,
``<out>/llama-7b-quant-levers-<gpu>.json`` (keys ``gpu``, ``model``, ``command``, ``rows``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = {
    "default": {},
    "mse2.4": {"mse": 2.4},
    "gptaq": {"gptaq": True},
    "foem": {"foem": True},
    "static": {"static_groups": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a 7B-shape fp16 model folder (made there if missing)")
    parser.add_argument("--tokenizer", default="/root/keep/tok32k", help="for a model made here")
    parser.add_argument("--configs", default="default,mse2.4,gptaq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--cal-samples", type=int, default=128)
    parser.add_argument("--cal-len", type=int, default=2048)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import torch

    from modelfactory import stage_store
    from modelfactory.core.specs import ModelSource, QuantSpec
    from modelfactory.tasks.download import download_model
    from modelfactory.tasks.quantize import quantize_model
    from quant_levers import _g_idx_in_column_order

    if not Path(args.model).is_dir():
        from compile_cache import make_model

        made = time.perf_counter()
        make_model("llama-7b", args.tokenizer, args.model)
        print(f"made {args.model} in {time.perf_counter() - made:.0f} s", flush=True)
    base = download_model(source=ModelSource(uri=str(Path(args.model).absolute())))
    out = {"gpu": torch.cuda.get_device_name(), "model": "Llama-2-7B shape (random weights, fp16)",
           "command": " ".join(["python3", *sys.argv]), "group_size": args.group_size,
           "calibration": f"{args.cal_samples} x {args.cal_len}", "rows": []}
    path = Path(args.out) / f"llama-7b-quant-levers-{out['gpu'].split()[-1].lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        spec = QuantSpec.model_validate({**ROWS[name], "group_size": args.group_size,
                                         "calibration": {"num_samples": args.cal_samples, "seq_len": args.cal_len}})
        start = time.perf_counter()
        quant = quantize_model(model=base, spec=spec)
        wall_s = time.perf_counter() - start
        folder = Path(stage_store.resolve(quant.model.path))
        row = {"config": name, "levers": ROWS[name], "label": spec.label(), "quantize_s": quant.quantize_s,
               "step_wall_s": None if quant.model.reused else wall_s, "reused": quant.model.reused,
               "g_idx_in_column_order": _g_idx_in_column_order(folder, args.group_size)}
        out["rows"].append(row)
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps(row), flush=True)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
