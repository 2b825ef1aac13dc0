"""The Hub model card (README.md) of a published GPTQ model, rendered from its manifest.

YAML metadata (``base_model``, ``base_model_relation: quantized``, ``library_name``, tags, and the
evaluation results as ``model-index`` — built with huggingface_hub's ``ModelCardData`` /
``EvalResult``, so the Hub renders them), the "Load it" code the runnability check ran, fp16 and
GPTQ side by side (perplexity, KL divergence and top-1 agreement with fp16, lm-eval task scores with
their recovery, decode tok/s per batch size, size, memory), the exact quantization spec and
calibration set, the gate result, a sweep's matrix when there is one, and the sources. Everything
comes from the manifest; whatever a manifest lacks (one written before a metric existed) is left out.

:func:`~modelfactory.core.secrets.redact` removes credentials (URL user info, signed-URL parameters,
``hf_`` tokens and any value passed as *secrets*), and local sources are named by file or folder
name + SHA-256 (:mod:`modelfactory.publishing.public`; any other path of this machine is cut to its
last component).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from modelfactory.core.ids import is_hub_repo_id
from modelfactory.core.secrets import redact
from modelfactory.publishing.public import (
    is_local_ref,
    local_roots,
    public_ref,
    public_spec,
    retarget_snippet,
    scrub_text,
)

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCardData

#: ``(name, side)`` → value: every number a manifest's metrics hold.
Values = dict[tuple[str, str], float]

#: ``task_<task>_<acc|acc_norm>[_stderr]`` (side metrics of an lm-eval task).
TASK_METRIC = re.compile(r"^task_(?P<task>.+?)_(?P<metric>acc|acc_norm)(?P<stderr>_stderr)?$")
TASK_RECOVERY = "task_recovery_pct_"
#: ``decode_tok_s_b<N>`` (side) / ``decode_speedup_b<N>`` (delta): decode at batch size N.
BATCH_METRIC = re.compile(r"^decode_(?:tok_s|speedup)_b(?P<batch>\d+)$")


class TaskDataset(NamedTuple):
    """What the Hub's ``model-index`` says about an lm-eval task's data."""

    name: str
    type: str  # Hub dataset id
    config: str | None
    split: str


#: lm-eval multiple-choice tasks whose dataset is known (a task ``<name>_local`` is ``<name>`` on a local copy).
TASK_DATASETS: dict[str, TaskDataset] = {
    "piqa": TaskDataset("PIQA", "ybisk/piqa", None, "validation"),
    "arc_easy": TaskDataset("AI2 ARC (Easy)", "allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": TaskDataset("AI2 ARC (Challenge)", "allenai/ai2_arc", "ARC-Challenge", "test"),
    "hellaswag": TaskDataset("HellaSwag", "Rowan/hellaswag", None, "validation"),
    "winogrande": TaskDataset("WinoGrande", "allenai/winogrande", "winogrande_xl", "validation"),
    "boolq": TaskDataset("BoolQ", "super_glue", "boolq", "validation"),
    "openbookqa": TaskDataset("OpenBookQA", "allenai/openbookqa", "main", "test"),
    "sciq": TaskDataset("SciQ", "allenai/sciq", None, "test"),
}
METRIC_NAMES = {"acc": "accuracy", "acc_norm": "accuracy (length-normalized)"}


# --------------------------------------------------------------------------- formatting
def _mb(n: Any) -> str:
    return f"{n / 1e6:,.1f} MB" if isinstance(n, (int, float)) and n > 0 else "n/a"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "n/a"


def _text_label(text: Mapping[str, Any]) -> str:
    return public_ref(text.get("path")) or f"{text.get('dataset')}/{text.get('config')}:{text.get('split')}"


def _sha(sha: Any) -> str:
    return f"`{sha}`" if sha else "n/a"


def hub_base_model(uri: str | None) -> str | None:
    """``owner/name`` when the base model came from the Hub, else None (local folders, GGUF files)."""
    if not uri:
        return None
    repo = uri.removeprefix("hf://")
    return repo if uri.startswith("hf://") and is_hub_repo_id(repo) else None


# --------------------------------------------------------------------------- what was measured
def measured_values(manifest: Mapping[str, Any]) -> Values:
    """Every number in the manifest's metrics by ``(name, side)``: the sides' records (``fp16``,
    ``gptq``), ``ratios`` (side ``delta``), then the ``measured`` rows (which win: they are exactly
    what the catalog recorded)."""
    metrics = manifest.get("metrics") or {}
    values: Values = {}
    for side in ("fp16", "gptq"):
        record = metrics.get(side) or {}
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[(name, side)] = float(value)
        for batch, rate in (record.get("decode_tok_s_by_batch") or {}).items():  # SideMetrics' per-batch rates
            if str(batch) != "1" and isinstance(rate, (int, float)):
                values[(f"decode_tok_s_b{batch}", side)] = float(rate)
    for name, value in (metrics.get("ratios") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[(name, "delta")] = float(value)
    for row in metrics.get("measured") or []:
        if isinstance(row.get("value"), (int, float)):
            values[(row["name"], row.get("side", ""))] = float(row["value"])
    return values


def task_names(values: Values) -> list[str]:
    """The lm-eval tasks measured (from ``task_<task>_acc…`` and ``task_recovery_pct_<task>``), sorted."""
    tasks = {m["task"] for (name, _side) in values if (m := TASK_METRIC.match(name))}
    tasks |= {name.removeprefix(TASK_RECOVERY) for (name, side) in values
              if side == "delta" and name.startswith(TASK_RECOVERY)}
    return sorted(tasks)


def decode_batches(values: Values) -> list[int]:
    """The decode batch sizes measured beyond batch 1 (``decode_tok_s_b<N>``, ``decode_speedup_b<N>``)."""
    return sorted({int(m["batch"]) for (name, _side) in values if (m := BATCH_METRIC.match(name))} - {1})


def task_dataset(task: str) -> TaskDataset | None:
    """The dataset of a known lm-eval task (``piqa_local`` is ``piqa`` read from local files)."""
    return TASK_DATASETS.get(task) or TASK_DATASETS.get(task.removesuffix("_local"))


def _round(value: float) -> float:
    return float(f"{value:.6g}")


# --------------------------------------------------------------------------- metadata
def eval_results(manifest: Mapping[str, Any]) -> list[EvalResult]:
    """The GPTQ model's evaluation results for ``model-index``: perplexity (with KL divergence and
    top-1 agreement against fp16, measured on the same windows) and each lm-eval task's acc / acc_norm."""
    from huggingface_hub import EvalResult

    values = measured_values(manifest)
    results: list[EvalResult] = []
    text = ((manifest.get("spec") or {}).get("benchmark") or {}).get("perplexity", {}).get("text") or {}
    if text.get("path"):
        name = public_ref(text["path"]) or "text"
        ppl_data = {"dataset_type": name, "dataset_name": name}
    else:
        ppl_data = {"dataset_type": str(text.get("dataset") or "wikitext"),
                    "dataset_name": str(text.get("dataset") or "wikitext"),
                    "dataset_config": text.get("config"), "dataset_split": text.get("split")}
    for metric, side, label in (("perplexity", "gptq", "perplexity"),
                                ("kld_mean", "delta", "KL divergence from fp16, mean (nats/token)"),
                                ("kld_p99", "delta", "KL divergence from fp16, 99th percentile (nats/token)"),
                                ("top1_agreement_pct", "delta", "top-1 agreement with fp16 (%)")):
        value = values.get((metric, side))
        if value is not None:
            results.append(EvalResult(task_type="text-generation", metric_type=metric, metric_value=_round(value),
                                      metric_name=label, **ppl_data))
    for task in task_names(values):
        dataset = task_dataset(task)
        data = ({"dataset_type": dataset.type, "dataset_name": dataset.name, "dataset_config": dataset.config,
                 "dataset_split": dataset.split} if dataset else {"dataset_type": task, "dataset_name": task})
        for metric in ("acc", "acc_norm"):
            value = values.get((f"task_{task}_{metric}", "gptq"))
            if value is not None:
                results.append(EvalResult(task_type="multiple-choice" if dataset else "text-generation",
                                          task_name=task, metric_type=metric, metric_value=_round(value),
                                          metric_name=METRIC_NAMES[metric], **data))
    return results


def card_data(manifest: Mapping[str, Any], *, model_name: str) -> ModelCardData:
    """The card's YAML metadata (huggingface_hub's ``ModelCardData``; ``model-index`` named *model_name*)."""
    from huggingface_hub import ModelCardData

    quant = manifest["spec"]["quantize"]
    base = hub_base_model(manifest["sources"]["base"].get("uri"))
    tags = ["gptq", f"{quant['bits']}-bit", "quantized", "modelfactory"]
    if quant.get("desc_act"):
        tags.append("act-order")
    if manifest["sources"].get("adapters"):
        tags.append("lora-merged")
    extra = {"base_model_relation": "quantized"} if base else {}
    return ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         eval_results=eval_results(manifest) or None, model_name=model_name, **extra)


def card_metadata(manifest: Mapping[str, Any], *, model_name: str | None = None) -> dict[str, Any]:
    """:func:`card_data` as a dict (the README's front matter)."""
    return card_data(manifest, model_name=model_name or str(manifest.get("name") or "model")).to_dict()


# --------------------------------------------------------------------------- sections
DEVICE_NAMES = {"cpu": "CPU", "cuda": "a CUDA GPU"}


def _path_label(entry: Mapping[str, Any]) -> str:
    path = entry.get("path") or "default"
    return "the default loading path" if path == "default" else f"GPTQModel's `{path}` kernel"


def _checked(entry: Mapping[str, Any]) -> str:
    device = DEVICE_NAMES.get(entry.get("device"), str(entry.get("device")))
    if entry.get("ok"):
        timing = ", ".join(f"{what} in {entry[key]:.1f} s" for what, key in (("loaded", "load_s"),
                                                                                ("generated", "generate_s"))
                           if isinstance(entry.get(key), (int, float)))
        agreement = entry.get("top1_agreement_pct")
        computes = (f"; computes what was measured: its most likely next token is the benchmark kernel's at "
                    f"{agreement:.1f} % of the checked positions" if isinstance(agreement, (int, float)) else "")
        kernel = f" (`{entry['kernel']}`)" if entry.get("kernel") else ""
        return (f"On {device} — verified with {_path_label(entry)}{kernel}: loads and generates"
                f"{f' ({timing})' if timing else ''}{computes}.")
    advice = f" {entry['advice']}" if entry.get("advice") else ""
    return (f"On {device} — {_path_label(entry)} **did not work** when checked: "
            f"`{entry.get('error') or 'wrong output'}`.{advice}")


def _load_section(manifest: Mapping[str, Any], repo_id: str, revision: str) -> str:
    checked = [e for e in manifest.get("runnability") or [] if e.get("snippet")]
    if checked:
        # Per device: what failed first (the default path, with why), then the code that was verified.
        blocks = [_checked(e) if not e.get("ok") else
                  f"{_checked(e)}\n\n```python\n{retarget_snippet(e['snippet'], model=repo_id, revision=revision).rstrip()}\n```"
                  for e in checked]
        transformers = ("transformers (needs `gptqmodel` installed for the GPTQ kernels). This is the code "
                        "modelfactory ran on these files before publishing them — a fresh Python process with "
                        "no factory code — and what it found on each device class:\n\n" + "\n\n".join(blocks))
    else:
        transformers = f"""transformers (needs `gptqmodel` installed for the GPTQ kernels):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{revision}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="{revision}")
out = model.generate(**tokenizer("Hello", return_tensors="pt").to(model.device), max_new_tokens=32)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```"""
    return f"""## Load it

{transformers}

vLLM (reads the GPTQ config from `config.json`; Marlin kernels on supported GPUs):

```bash
vllm serve {repo_id} --revision {revision}
```

```python
from vllm import LLM

llm = LLM(model="{repo_id}", revision="{revision}")
print(llm.generate("Hello")[0].outputs[0].text)
```
"""


def _score(values: Values, task: str, metric: str, side: str) -> str:
    value = values.get((f"task_{task}_{metric}", side))
    if value is None:
        return "n/a"
    stderr = values.get((f"task_{task}_{metric}_stderr", side))
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def _recovery(a: float | None, b: float | None) -> str:
    return f"{b / a * 100:.1f} % of fp16" if a and b is not None else ""


def _quality_rows(values: Values, ppl_label: str) -> list[tuple[str, str, str, str]]:
    get = values.get
    ppl_pct = get(("ppl_increase_pct", "delta"))
    rows = [(ppl_label, _num(get(("perplexity", "fp16"))), _num(get(("perplexity", "gptq"))),
             f"{ppl_pct:+.1f} %" if ppl_pct is not None else "n/a")]
    # measured on the perplexity windows: a per-token comparison of the two sides' next-token distributions
    for name, label, fmt in (("kld_mean", "KL(fp16 ‖ GPTQ) per token, mean (nats)", "{:.5f}"),
                             ("kld_p99", "KL(fp16 ‖ GPTQ) per token, 99th percentile (nats)", "{:.5f}"),
                             ("top1_agreement_pct", "top-1 agreement with fp16 (same most likely next token)",
                              "{:.2f} %")):
        if get((name, "delta")) is not None:
            rows.append((f"{label}, same windows", "—", fmt.format(get((name, "delta"))), ""))
    return rows


def _task_rows(values: Values) -> list[tuple[str, str, str, str]]:
    rows = []
    for task in task_names(values):
        dataset = task_dataset(task)
        label = f"{task} ({dataset.name} {dataset.split}, lm-eval)" if dataset else f"{task} (lm-eval)"
        for metric in ("acc", "acc_norm"):
            a, b = values.get((f"task_{task}_{metric}", "fp16")), values.get((f"task_{task}_{metric}", "gptq"))
            if a is not None or b is not None:
                rows.append((f"{label} {metric}", _score(values, task, metric, "fp16"),
                             _score(values, task, metric, "gptq"), _recovery(a, b)))
        recovery = values.get((f"{TASK_RECOVERY}{task}", "delta"))
        if recovery is not None:
            rows.append((f"{task} recovery (GPTQ ÷ fp16, as gated)", "", "", f"{recovery:.1f} %"))
    overall = values.get(("task_recovery_pct", "delta"))
    if overall is not None and len(task_names(values)) > 1:
        rows.append(("task recovery, lowest over tasks", "", "", f"{overall:.1f} %"))
    return rows


def _speed_rows(values: Values, manifest: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    get = values.get
    dec = (manifest["spec"].get("benchmark") or {}).get("decode") or {}
    mode = ((manifest.get("metrics") or {}).get("gptq") or {}).get("decode_mode", "eager")
    rows = [(f"decode tok/s (batch 1, {dec.get('new_tokens')} new tokens, {mode})",
             _num(get(("decode_tok_s", "fp16")), "{:.1f}"), _num(get(("decode_tok_s", "gptq")), "{:.1f}"),
             _num(get(("decode_speedup", "delta")), "{:.2f}×"))]
    for batch in decode_batches(values):
        a, b = get((f"decode_tok_s_b{batch}", "fp16")), get((f"decode_tok_s_b{batch}", "gptq"))
        speedup = get((f"decode_speedup_b{batch}", "delta"))
        if speedup is None and a and b is not None:
            speedup = b / a
        rows.append((f"decode tok/s (batch {batch}, all sequences)", _num(a, "{:.1f}"), _num(b, "{:.1f}"),
                     _num(speedup, "{:.2f}×")))
    rows.append(("time to first token (ms)", _num(get(("ttft_ms", "fp16")), "{:.1f}"),
                 _num(get(("ttft_ms", "gptq")), "{:.1f}"), ""))
    return rows


def _metrics_section(manifest: Mapping[str, Any]) -> str:
    metrics = manifest.get("metrics") or {}
    a, b = metrics.get("fp16") or {}, metrics.get("gptq") or {}
    values = measured_values(manifest)
    get = values.get
    ppl = (manifest["spec"].get("benchmark") or {}).get("perplexity") or {}
    ppl_label = (f"perplexity ({_text_label(ppl.get('text') or {})}, {a.get('ppl_tokens', 'n/a')} tokens, "
                 f"{ppl.get('context_len')}-token windows)")
    rows = [*_quality_rows(values, ppl_label), *_task_rows(values), *_speed_rows(values, manifest),
            ("safetensors on disk", _mb(get(("disk_bytes", "fp16"))), _mb(get(("disk_bytes", "gptq"))),
             _num(get(("size_ratio", "delta")), "{:.3f}×")),
            (f"memory after load ({b.get('memory_kind', 'n/a')})", _mb(get(("mem_after_load_bytes", "fp16"))),
             _mb(get(("mem_after_load_bytes", "gptq"))), _num(get(("memory_ratio", "delta")), "{:.3f}×")),
            ("peak memory", _mb(get(("mem_peak_bytes", "fp16"))), _mb(get(("mem_peak_bytes", "gptq"))), "")]
    lines = ["## Benchmark vs FP16", "",
             f"Measured by modelfactory's one harness, each side in a fresh process: fp16 on "
             f"{a.get('device', 'n/a')} ({a.get('dtype', 'n/a')}), GPTQ on {b.get('device', 'n/a')} "
             f"(kernel `{b.get('kernel', 'n/a')}`: every GPTQ number below is from that kernel"
             f"{_kld_method(manifest)})." + _kernels_users_get(manifest, b.get("kernel"))
             + (" Task scores are lm-evaluation-harness's (its prompts and scoring, ± its standard error); "
                "recovery is the GPTQ score as a share of fp16's." if task_names(values) else ""), "",
             "| metric | fp16 | GPTQ | GPTQ vs fp16 |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {x} | {y} | {z} |" for m, x, y, z in rows]
    return "\n".join(lines) + "\n"


def _kld_method(manifest: Mapping[str, Any]) -> str:
    method = (manifest.get("agreement") or {}).get("kld_method")
    return {"exact": "; the KL divergence is exact, over the full vocabulary",
            "topk_lower_bound": "; the KL divergence is a top-k lower bound"}.get(method, "")


def _kernels_users_get(manifest: Mapping[str, Any], measured: str | None) -> str:
    """Where a plain load gets another kernel than the measured one: how closely it computes the same."""
    others = [e for e in manifest.get("runnability") or []
              if e.get("ok") and e.get("kernel") and e.get("kernel") != measured
              and isinstance(e.get("top1_agreement_pct"), (int, float))]
    return "".join(f" On {DEVICE_NAMES.get(e['device'], e['device'])}, {_path_label(e)} gets `{e['kernel']}`: its "
                   f"most likely next token is the measured kernel's at {e['top1_agreement_pct']:.1f} % of the "
                   f"checked positions." for e in others)


def _quant_section(manifest: Mapping[str, Any]) -> str:
    q = manifest["spec"]["quantize"]
    cal = q.get("calibration", {})
    keys = ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential", "batch_size")
    auto = set((manifest.get("auto_resolved") or {}).get("quantize") or ())
    lines = ["## Quantization", "", f"GPTQ with {manifest.get('engine', 'n/a')}:", "",
             "| setting | value |", "| --- | --- |"]
    lines += [f"| `{k}` | `{q[k]}`{' (auto: the largest size dividing every layer width)' if k in auto else ''} |"
              for k in keys if k in q]
    lines += ["", f"Calibration set: {cal.get('num_samples')} sequences × {cal.get('seq_len')} tokens of "
                  f"`{_text_label(cal.get('text', {}))}` (seed {cal.get('seed')})."]
    lines += ["", "Exact spec (as run):", "", "```yaml",
              yaml.safe_dump({"quantize": public_spec(q)[0]}, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _gate_section(manifest: Mapping[str, Any]) -> str:
    gate = manifest.get("gate") or {}
    checks = gate.get("checks") or []
    verdict = "passed" if gate.get("passed") else "rejected"
    lines = ["## Gate", "", f"**{verdict}** ({len(checks)} check{'' if len(checks) == 1 else 's'})."]
    if checks:
        lines += ["", "| check | threshold | observed | result |", "| --- | --- | --- | --- |"]
        lines += [f"| `{c['metric']}` | {_num(c.get('threshold'), '{:g}')} | {_num(c.get('observed'), '{:.4g}')} | "
                  f"{'pass' if c.get('passed') else 'FAIL'} |" for c in checks]
    return "\n".join(lines) + "\n"


def _source_text(uri: str | None, sha: Any, local: Any = None) -> str:
    """A source as the card names it: a Hub/S3 URI @ its commit, a local one by name + SHA-256."""
    if uri and (local or is_local_ref(uri)):
        kind = local if local in ("file", "folder") else "file" if uri.lower().endswith(".gguf") else "folder"
        return f"`{public_ref(uri)}` (local {kind}, sha256 {_sha(sha)})"
    return f"`{uri}` @ `{sha}`"


def _sources_section(manifest: Mapping[str, Any]) -> str:
    src = manifest["sources"]
    base = src["base"]
    lines = ["## Sources", "", f"- base model: {_source_text(base.get('uri'), base.get('sha'), base.get('local'))}"]
    for adapter in src.get("adapters") or []:
        lines.append(f"- LoRA adapter: {_source_text(adapter.get('source_uri'), adapter.get('sha'), adapter.get('local'))}"
                     f", weight {adapter.get('weight')} (merged before quantization)")
    for entry in src.get("local") or []:
        if entry.get("field") not in ("base.uri",) and not str(entry.get("field", "")).startswith("adapters["):
            lines.append(f"- `{entry.get('field')}`: `{entry.get('name')}` (local, sha256 {_sha(entry.get('sha256'))})")
    lines += ["", f"`manifest.json` lists every file with its size and sha256 ({len(manifest['files'])} files, "
                  f"{_mb(manifest.get('total_bytes'))}); artifact key `{manifest.get('key')}`, "
                  f"created {manifest.get('created_at')}."]
    return "\n".join(lines) + "\n"


def _sweep_section(matrix_markdown: str | None) -> str:
    if not matrix_markdown or not matrix_markdown.strip():
        return ""
    return ("## Sweep\n\nThis build is one of a sweep of quantization configurations of the same model, each "
            "built and measured the same way:\n\n" + matrix_markdown.strip() + "\n")


def render_card(*, manifest: Mapping[str, Any], repo_id: str, revision: str, secrets: Iterable[str] = (),
                matrix_markdown: str | None = None) -> str:
    """README.md for *repo_id* at *revision* (YAML front matter + body), credentials redacted and
    no path of this machine in it; *matrix_markdown*: the sweep matrix, when a sweep chose this build."""
    quant = manifest["spec"]["quantize"]
    base_src = manifest["sources"]["base"]
    base = hub_base_model(base_src.get("uri"))
    n_adapters = len(manifest["sources"].get("adapters") or [])
    group = "no grouping" if quant["group_size"] == -1 else f"group size {quant['group_size']}"
    merged = f" with {n_adapters} LoRA adapter{'s' if n_adapters > 1 else ''} merged in" if n_adapters else ""
    # relative link: works on any Hub endpoint
    base_text = f"[{base}](/{base})" if base else _source_text(base_src.get("uri"), base_src.get("sha"),
                                                                base_src.get("local"))
    gate = manifest.get("gate") or {}
    body = "\n".join(part for part in [
        f"# {manifest.get('name', repo_id)} — GPTQ {quant['bits']}-bit, {group}",
        "",
        f"GPTQ {quant['bits']}-bit quantization of {base_text}{merged}, made and verified by modelfactory. "
        f"This is branch `{revision}` of `{repo_id}` (one branch per quantization config). "
        f"Quality gate: **{'passed' if gate.get('passed') else 'rejected'}**.",
        "",
        _load_section(manifest, repo_id, revision),
        _metrics_section(manifest),
        _quant_section(manifest),
        _gate_section(manifest),
        _sweep_section(matrix_markdown),
        _sources_section(manifest),
    ] if part is not None)
    front = card_data(manifest, model_name=repo_id).to_yaml()
    card = redact(f"---\n{front}\n---\n\n{body}", secrets=secrets)
    return scrub_text(card, roots=local_roots())
