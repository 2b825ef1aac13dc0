"""A run in Markdown: the Prefect artifact that the record step leaves on every factory run."""

from __future__ import annotations

from collections.abc import Callable

from modelfactory.catalog.records import RunDetail
from modelfactory.reports.cells import adapters_text, md_cell, short


#: Groups of the run artifact's metric tables, in order: (title, does this metric name belong to it).
METRIC_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("quality vs fp16", lambda n: n.startswith(("perplexity", "ppl_", "kld_", "top1_"))),
    ("tasks (lm-eval)", lambda n: n.startswith("task_")),
    ("speed", lambda n: n.startswith(("decode_", "ttft_", "load_s", "quantize_s"))),
    ("size and memory", lambda n: n.startswith(("disk_", "size_", "mem_", "memory_"))),
    ("other", lambda n: True),
)


def metric_group(name: str) -> str:
    """The title of the run artifact's table that shows metric *name* (:data:`METRIC_GROUPS`)."""
    return next(title for title, member in METRIC_GROUPS if member(name))


def run_markdown(detail: RunDetail) -> str:
    """A run in Markdown (the Prefect artifact): every metric recorded, fp16 / gptq / delta side by
    side in one table per group (:data:`METRIC_GROUPS`), the runnability checks, the gate verdict."""
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.6g}"

    lines = [f"# run `{detail.id}` · {detail.name} · **{detail.status}**", "",
             f"config `{detail.config or '-'}` · base `{detail.base_uri or '-'}` @ `{(detail.base_sha or '-')[:12]}`"]
    if detail.adapters:
        lines.append(f" · adapters {adapters_text(detail.adapters)}")
    sides = ["fp16", "gptq", "delta", ""]
    names = list(dict.fromkeys(m.name for m in detail.metrics))
    for title, _ in METRIC_GROUPS:
        group = [name for name in names if metric_group(name) == title]
        if not group:
            continue
        lines += ["", f"### {title}", "", "| metric | fp16 | gptq | delta | value | unit |", "|---|---:|---:|---:|---:|---|"]
        for name in group:
            unit = next(m.unit for m in detail.metrics if m.name == name)
            lines.append(f"| {name} | " + " | ".join(cell(detail.value(name, side)) for side in sides) + f" | {unit} |")
    lines += _runnability_markdown(detail)
    if detail.gate_checks:
        lines += ["", "| gate check | threshold | observed | passed |", "|---|---:|---:|---|"]
        lines += [f"| {c.metric} | {c.threshold:g} | {cell(c.observed)} | {'yes' if c.passed else '**no**'} |"
                  for c in detail.gate_checks]
    for artifact in detail.artifacts:
        lines += ["", f"artifact ({artifact.kind}): `{artifact.uri}` manifest `{artifact.manifest_sha256}`"]
    if detail.error:
        lines += ["", f"**{detail.error_kind or 'error'}**: {short(detail.error, 500)}"]
    return "\n".join(lines) + "\n"


def _runnability_markdown(detail: RunDetail) -> list[str]:
    """The ``runnability`` step (plain-transformers load + generate per device), when the run recorded one."""
    step = next((s for s in detail.steps if s.name == "runnability"), None)
    if step is None:
        return []
    lines = ["", f"### runnability (plain transformers): {step.status}"]
    results = [r for r in ((step.detail or {}).get("results") or []) if isinstance(r, dict)]
    if results:
        lines += ["", "| device | runs | load s | generate s | error |", "|---|---|---:|---:|---|"]
        for r in results:
            error = " ".join(str(x) for x in (r.get("error"), r.get("advice")) if x)
            lines.append(f"| {r.get('device')} | {'yes' if r.get('ok') else '**no**'} | {_secs(r.get('load_s'))} | "
                         f"{_secs(r.get('generate_s'))} | {md_cell(short(error, 300))} |")
    return lines


def _secs(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else ""
