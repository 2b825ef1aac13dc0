"""The Hub model card (README.md) of a published GPTQ model, rendered from its manifest.

YAML metadata (``base_model``, ``base_model_relation: quantized``, ``library_name``, tags), the
benchmark table against fp16, the exact quantization spec and calibration set, the gate result,
sources, and loading snippets for transformers and vLLM. Everything comes from the manifest;
:func:`~modelfactory.core.secrets.redact` removes credentials (URL user info, signed-URL parameters, ``hf_`` tokens and any
value passed as *secrets*) from the rendered text.
"""

from __future__ import annotations

from typing import Any, Iterable

import yaml

from modelfactory.core.ids import is_hub_repo_id
from modelfactory.core.secrets import redact


# --------------------------------------------------------------------------- formatting
def _mb(n: Any) -> str:
    return f"{n / 1e6:,.1f} MB" if isinstance(n, (int, float)) and n > 0 else "n/a"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "n/a"


def _text_label(text: dict[str, Any]) -> str:
    return text.get("path") or f"{text.get('dataset')}/{text.get('config')}:{text.get('split')}"


def hub_base_model(uri: str | None) -> str | None:
    """``owner/name`` when the base model came from the Hub, else None (local folders, GGUF files)."""
    if not uri:
        return None
    repo = uri.removeprefix("hf://")
    return repo if uri.startswith("hf://") and is_hub_repo_id(repo) else None


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    quant = manifest["spec"]["quantize"]
    base = hub_base_model(manifest["sources"]["base"].get("uri"))
    tags = ["gptq", f"{quant['bits']}-bit", "quantized", "modelfactory"]
    if quant.get("desc_act"):
        tags.append("act-order")
    if manifest["sources"].get("adapters"):
        tags.append("lora-merged")
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags})
    return meta


# --------------------------------------------------------------------------- sections
def _load_section(repo_id: str, revision: str) -> str:
    return f"""## Load it

transformers (needs `gptqmodel` installed for the GPTQ kernels):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{revision}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="{revision}")
out = model.generate(**tokenizer("Hello", return_tensors="pt").to(model.device), max_new_tokens=32)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

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


def _metrics_section(manifest: dict[str, Any]) -> str:
    metrics = manifest.get("metrics") or {}
    a, b, r = metrics.get("fp16") or {}, metrics.get("gptq") or {}, metrics.get("ratios") or {}
    bench = manifest["spec"].get("benchmark", {})
    ppl, dec = bench.get("perplexity", {}), bench.get("decode", {})
    ppl_pct = r.get("ppl_increase_pct")
    rows = [
        (f"perplexity ({_text_label(ppl.get('text', {}))}, {a.get('ppl_tokens', 'n/a')} tokens, "
         f"{ppl.get('context_len')}-token windows)",
         _num(a.get("perplexity")), _num(b.get("perplexity")),
         f"{ppl_pct:+.1f} %" if isinstance(ppl_pct, (int, float)) else "n/a"),
        (f"decode tok/s (batch 1, {dec.get('new_tokens')} new tokens, {b.get('decode_mode', 'eager')})",
         _num(a.get("decode_tok_s"), "{:.1f}"), _num(b.get("decode_tok_s"), "{:.1f}"),
         _num(r.get("decode_speedup"), "{:.2f}×")),
        ("time to first token (ms)", _num(a.get("ttft_ms"), "{:.1f}"), _num(b.get("ttft_ms"), "{:.1f}"), ""),
        ("safetensors on disk", _mb(a.get("disk_bytes")), _mb(b.get("disk_bytes")), _num(r.get("size_ratio"), "{:.3f}×")),
        (f"memory after load ({b.get('memory_kind', 'n/a')})", _mb(a.get("mem_after_load_bytes")),
         _mb(b.get("mem_after_load_bytes")), _num(r.get("memory_ratio"), "{:.3f}×")),
        ("peak memory", _mb(a.get("mem_peak_bytes")), _mb(b.get("mem_peak_bytes")), ""),
    ]
    lines = ["## Benchmark vs FP16", "",
             f"Measured by modelfactory's one harness, each side in a fresh process: fp16 on "
             f"{a.get('device', 'n/a')} ({a.get('dtype', 'n/a')}), GPTQ on {b.get('device', 'n/a')} "
             f"(kernel `{b.get('kernel', 'n/a')}`).", "",
             "| metric | fp16 | GPTQ | GPTQ / fp16 |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {x} | {y} | {z} |" for m, x, y, z in rows]
    return "\n".join(lines) + "\n"


def _quant_section(manifest: dict[str, Any]) -> str:
    q = manifest["spec"]["quantize"]
    cal = q.get("calibration", {})
    keys = ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential", "batch_size")
    lines = ["## Quantization", "", f"GPTQ with {manifest.get('engine', 'n/a')}:", "",
             "| setting | value |", "| --- | --- |"]
    lines += [f"| `{k}` | `{q[k]}` |" for k in keys if k in q]
    lines += ["", f"Calibration set: {cal.get('num_samples')} sequences × {cal.get('seq_len')} tokens of "
                  f"`{_text_label(cal.get('text', {}))}` (seed {cal.get('seed')})."]
    lines += ["", "Exact spec (as run):", "", "```yaml",
              yaml.safe_dump({"quantize": q}, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _gate_section(manifest: dict[str, Any]) -> str:
    gate = manifest.get("gate") or {}
    checks = gate.get("checks") or []
    verdict = "passed" if gate.get("passed") else "rejected"
    lines = ["## Gate", "", f"**{verdict}** ({len(checks)} check{'' if len(checks) == 1 else 's'})."]
    if checks:
        lines += ["", "| check | threshold | observed | result |", "| --- | --- | --- | --- |"]
        lines += [f"| `{c['metric']}` | {_num(c.get('threshold'), '{:g}')} | {_num(c.get('observed'), '{:.4g}')} | "
                  f"{'pass' if c.get('passed') else 'FAIL'} |" for c in checks]
    return "\n".join(lines) + "\n"


def _sources_section(manifest: dict[str, Any]) -> str:
    src = manifest["sources"]
    base = src["base"]
    lines = ["## Sources", "", f"- base model: `{base.get('uri')}` @ `{base.get('sha')}`"]
    for adapter in src.get("adapters") or []:
        lines.append(f"- LoRA adapter: `{adapter.get('source_uri')}` @ `{adapter.get('sha')}`, "
                     f"weight {adapter.get('weight')} (merged before quantization)")
    lines += ["", f"`manifest.json` lists every file with its size and sha256 ({len(manifest['files'])} files, "
                  f"{_mb(manifest.get('total_bytes'))}); artifact key `{manifest.get('key')}`, "
                  f"created {manifest.get('created_at')}."]
    return "\n".join(lines) + "\n"


def render_card(*, manifest: dict[str, Any], repo_id: str, revision: str, secrets: Iterable[str] = ()) -> str:
    """README.md for *repo_id* at *revision* (YAML front matter + body), credentials redacted."""
    quant = manifest["spec"]["quantize"]
    base_uri = manifest["sources"]["base"].get("uri")
    base = hub_base_model(base_uri)
    n_adapters = len(manifest["sources"].get("adapters") or [])
    group = "no grouping" if quant["group_size"] == -1 else f"group size {quant['group_size']}"
    merged = f" with {n_adapters} LoRA adapter{'s' if n_adapters > 1 else ''} merged in" if n_adapters else ""
    base_text = f"[{base}](/{base})" if base else f"`{base_uri}`"  # relative: works on any Hub endpoint
    gate = manifest.get("gate") or {}
    body = "\n".join([
        f"# {manifest.get('name', repo_id)} — GPTQ {quant['bits']}-bit, {group}",
        "",
        f"GPTQ {quant['bits']}-bit quantization of {base_text}{merged}, made and verified by modelfactory. "
        f"This is branch `{revision}` of `{repo_id}` (one branch per quantization config). "
        f"Quality gate: **{'passed' if gate.get('passed') else 'rejected'}**.",
        "",
        _load_section(repo_id, revision),
        _metrics_section(manifest),
        _quant_section(manifest),
        _gate_section(manifest),
        _sources_section(manifest),
    ])
    front = yaml.safe_dump(card_metadata(manifest), sort_keys=False)
    return redact(f"---\n{front}---\n\n{body}", secrets=secrets)
