"""``modelfactory`` command line: demo, run, sweep, deploy, serve, and the catalog / watch / artifact groups.

Shared by every command (``interfaces/cli/common.py``): errors of the hierarchy end it with one clean
line and exit 1; ``--format`` takes ``table|json|csv`` (what the command's output allows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from modelfactory.core.errors import ModelFactoryError
from modelfactory.interfaces.cli.common import (
    Format,
    console,
    emit,
    err_console,
    fail,
    format_option,
    reported_errors,
)
from modelfactory.interfaces.cli.library_logs import library_logs
from modelfactory.interfaces.deploy import PoolType

if TYPE_CHECKING:
    from modelfactory.core.records import RunOutcome

app = typer.Typer(help="Turn fine-tuned LLMs into verified, benchmarked, published GPTQ models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _add_subcommands() -> None:
    from modelfactory.interfaces.cli import artifact as cli_artifact
    from modelfactory.interfaces.cli import catalog as cli_catalog
    from modelfactory.interfaces.cli import kernels as cli_kernels
    from modelfactory.interfaces.cli import watch as cli_watch

    app.add_typer(cli_catalog.app, name="catalog", help="Query the run catalog.")
    app.add_typer(cli_watch.app, name="watch", help="The watch list: repos whose new commits start the factory.")
    app.add_typer(cli_artifact.app, name="artifact", help="Read published artifacts back and verify them.")
    app.add_typer(cli_kernels.app, name="kernels", help="Build the GPU kernels ahead of the first GPTQ load.")


_add_subcommands()
#: ``run`` and ``demo`` print the run they made as ``catalog show`` does.
RunFormat = Annotated[Format, format_option(Format.table, Format.json, Format.csv)]


def _show_run(run_id: str, fmt: Format = Format.table) -> None:
    from modelfactory.catalog import open_catalog
    from modelfactory.interfaces.cli.render import detail_csv, record_json, run_detail_table

    with open_catalog() as catalog:
        detail = catalog.get_run(run_id)
    emit(fmt, table=lambda: run_detail_table(detail), json=lambda: record_json(detail),
         csv=lambda: detail_csv(detail))


def _run_and_report(run: Callable[[str], RunOutcome], fmt: Format) -> None:
    """Run, then print the run's metrics table and decision; exit 1 on failure, 2 on rejection. What the
    libraries log meanwhile goes to ``<home>/logs/run-<run id>.log``, not the console."""
    import uuid

    run_id = str(uuid.uuid4())
    with library_logs(f"run-{run_id}"):
        try:
            outcome = run(run_id)
        except ModelFactoryError as exc:
            _show_failed(run_id)
            fail(exc)
        with reported_errors():
            _show_run(outcome.run_id, fmt)
        if fmt is Format.table:
            colour = "green" if outcome.status == "passed" else "yellow"
            console.print(f"[{colour}]{outcome.status}[/{colour}]: {outcome.gate}"
                          + (f"\nartifact: {outcome.artifact_uri}" if outcome.artifact_uri else ""), soft_wrap=True)
        if outcome.status != "passed":
            raise typer.Exit(code=2)


def _show_failed(run_id: str) -> None:
    try:
        _show_run(run_id)
    except ModelFactoryError:
        pass  # the run never reached the catalog (e.g. catalog down): the error below says why


@app.command()
def demo(
    finetune_steps: Annotated[int, typer.Option(help="LoRA fine-tune steps before the factory run.")] = 24,
    format: RunFormat = Format.table,
) -> None:
    """Run the whole factory on the real SmolLM2-135M-Instruct with a freshly trained LoRA adapter."""
    from modelfactory.interfaces.demo import run_demo

    _run_and_report(lambda run_id: run_demo(finetune_steps=finetune_steps, run_id=run_id), format)


@app.command()
def run(
    spec: Annotated[Optional[Path], typer.Option(help="YAML/JSON spec file; flags below override it.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model: Hub id, local folder or .gguf file.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of the base model.")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(help="LoRA adapter (repeatable); 'PATH@WEIGHT' sets a weight.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="GPTQ bits (2, 3, 4, 8).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="GPTQ group size (-1 = per row).")] = None,
    damp_percent: Annotated[Optional[float], typer.Option(help="GPTQ dampening.")] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", help="Activation order.")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--no-sym", help="Symmetric quantization.")] = None,
    true_sequential: Annotated[Optional[bool], typer.Option("--true-sequential/--no-true-sequential")] = None,
    calibration_path: Annotated[Optional[str], typer.Option(help="Calibration text file or folder.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Calibration sequences.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Calibration sequence length.")] = None,
    ppl_max_tokens: Annotated[Optional[int], typer.Option(help="Perplexity token budget.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    task: Annotated[Optional[list[str]], typer.Option(help="lm-eval task to evaluate (repeatable), e.g. piqa_local.")] = None,
    gate_preset: Annotated[Optional[str], typer.Option(
        help="Gate: 'default' (unset thresholds take the default gate's: docs/runnability.md) or 'none'.")] = None,
    max_ppl_increase_pct: Annotated[Optional[float], typer.Option(help="Gate: max perplexity increase %.")] = None,
    max_kld_mean: Annotated[Optional[float], typer.Option(help="Gate: max mean KL(fp16||GPTQ), nats.")] = None,
    max_kld_p99: Annotated[Optional[float], typer.Option(help="Gate: max p99 KL(fp16||GPTQ), nats.")] = None,
    min_top1_agreement_pct: Annotated[Optional[float], typer.Option(help="Gate: min top-1 agreement %.")] = None,
    min_task_recovery_pct: Annotated[Optional[float], typer.Option(help="Gate: min task score recovery % (with --task).")] = None,
    min_decode_speedup: Annotated[Optional[float], typer.Option(help="Gate: min decode speed-up at batch 1.")] = None,
    min_decode_speedup_at: Annotated[Optional[list[str]], typer.Option(
        help="Gate: min decode speed-up at a batch size, 'BATCH=X' (repeatable), e.g. 8=1.3.")] = None,
    max_size_ratio: Annotated[Optional[float], typer.Option(help="Gate: max disk size ratio.")] = None,
    max_memory_ratio: Annotated[Optional[float], typer.Option(help="Gate: max memory ratio.")] = None,
    require_runnable: Annotated[Optional[bool], typer.Option(
        "--require-runnable/--no-require-runnable", help="Gate: runs correctly in plain transformers.")] = None,
    require_default_path: Annotated[Optional[bool], typer.Option(
        "--require-default-path/--no-require-default-path",
        help="Gate: the library's default loading path works on every device checked.")] = None,
    destination: Annotated[Optional[str], typer.Option(help="Where to publish: file://folder, s3://bucket/prefix or hf://owner/repo.")] = None,
    format: RunFormat = Format.table,
) -> None:
    """Run the factory on a spec file and/or flags."""
    from modelfactory.core.specs import load_spec, merge_overrides, parse_spec
    from modelfactory.interfaces.runner import run_factory

    with reported_errors():
        data = load_spec(spec).model_dump(mode="json", exclude_unset=True) if spec else {}
    overrides = {
        "name": name,
        "base": {"uri": base, "revision": revision} if base else None,
        "adapters": [_adapter(a) for a in adapter] if adapter else None,
        "quantize": {"bits": bits, "group_size": group_size, "damp_percent": damp_percent, "desc_act": desc_act,
                     "sym": sym, "true_sequential": true_sequential,
                     "calibration": {"num_samples": num_samples, "seq_len": seq_len,
                                     "text": {"path": calibration_path} if calibration_path else None}},
        "benchmark": {"device": device, "perplexity": {"max_tokens": ppl_max_tokens},
                      "tasks": {"names": task} if task else None},
        "gate": {"preset": gate_preset, "max_ppl_increase_pct": max_ppl_increase_pct, "max_kld_mean": max_kld_mean,
                 "max_kld_p99": max_kld_p99, "min_top1_agreement_pct": min_top1_agreement_pct,
                 "min_task_recovery_pct": min_task_recovery_pct, "min_decode_speedup": min_decode_speedup,
                 "min_decode_speedup_by_batch": _speedups(min_decode_speedup_at) if min_decode_speedup_at else None,
                 "max_size_ratio": max_size_ratio, "max_memory_ratio": max_memory_ratio,
                 "require_runnable": require_runnable, "require_default_path": require_default_path},
        "publish": {"destination": destination},
    }
    data = merge_overrides(data, overrides)
    with reported_errors():
        checks = parse_spec(data, origin=str(spec or "flags")).gate_in_effect().describe()
    if format is Format.table:
        console.print(f"gate: checks in effect: {checks}", soft_wrap=True)
    _run_and_report(lambda run_id: run_factory(data, origin=str(spec or "flags"), run_id=run_id), format)


def _speedups(values: list[str]) -> dict[int, float]:
    """``--min-decode-speedup-at 8=1.3`` flags as ``{8: 1.3}`` (a clear error for anything else)."""
    from modelfactory.core.errors import SpecError

    parsed = {}
    for value in values:
        batch, _, minimum = value.partition("=")
        try:
            parsed[int(batch)] = float(minimum)
        except ValueError:
            fail(SpecError(f"--min-decode-speedup-at {value!r} is not BATCH=X (e.g. 8=1.3): fix the flag"))
    return parsed


#: ``sweep`` prints the sweep's matrix as ``catalog show SWEEP`` does.
SweepFormat = Annotated[Format, format_option(Format.table, Format.json)]


@app.command()
def sweep(
    spec: Annotated[Path, typer.Option(help="YAML/JSON sweep spec: base, adapters, grid or configs, objective, "
                                            "publish_mode (examples/sweep.yaml).")],
    format: SweepFormat = Format.table,
) -> None:
    """Quantize one model in several configurations, pick the winner by the objective, publish it.

    Exit 0 when a configuration passed (the winner), 2 when none passed, 1 on errors (also when
    every configuration failed).
    """
    import uuid

    from modelfactory.catalog import open_catalog
    from modelfactory.core.sweep_spec import load_sweep_spec
    from modelfactory.interfaces.cli.render import record_json, sweep_table
    from modelfactory.interfaces.runner import run_sweep

    with reported_errors():
        sweep_spec = load_sweep_spec(spec)
    sweep_id = str(uuid.uuid4())
    with library_logs(f"sweep-{sweep_id}"):
        try:
            outcome = run_sweep(sweep_spec, sweep_id=sweep_id)
        except ModelFactoryError as exc:
            with contextlib.suppress(ModelFactoryError):  # the sweep never reached the catalog: the error says why
                with open_catalog() as catalog:
                    detail = catalog.get_sweep(sweep_id)
                console.print(sweep_table(detail))
            fail(exc)
        with reported_errors(), open_catalog() as catalog:
            detail = catalog.get_sweep(outcome.sweep_id)
        emit(format, table=lambda: sweep_table(detail), json=lambda: record_json(detail))
        if format is Format.table:
            if outcome.winner is not None:
                published = ", ".join(f"{m.label} -> {m.artifact_uri}" for m in outcome.members if m.published)
                console.print(f"[green]winner[/green]: {outcome.winner_label} ({outcome.objective}); "
                              f"published {published or 'nothing'}", soft_wrap=True)
            else:
                console.print("[yellow]no configuration passed the gate[/yellow]: nothing published", soft_wrap=True)
        if outcome.winner is None:
            raise typer.Exit(code=1 if all(m.status == "failed" for m in outcome.members) else 2)


def _adapter(text: str) -> dict:
    uri, _, weight = text.rpartition("@") if "@" in text else (text, "", "")
    return {"uri": uri, "weight": float(weight)} if weight else {"uri": text}


@app.command()
def deploy(
    gpus: Annotated[Optional[int], typer.Option(help="Pool-wide limit: GPUs over all GPU hosts.")] = None,
    pool_type: Annotated[PoolType, typer.Option(help="process (infra/gpu-host) or kubernetes (infra/k8s)")] = "process",
    zombie_after: Annotated[float, typer.Option(help="Seconds without heartbeat before a gpu-stage run is Crashed.")] = 90,
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Only this deployment (repeatable).")] = None,
) -> None:
    """Apply deployments/prefect.yaml to PREFECT_API_URL: gpu pool, deployments, zombie-run automation."""
    from modelfactory.interfaces.deploy import deploy as apply_deployments

    with reported_errors():
        apply_deployments(gpus=gpus, names=name, pool_type=pool_type, zombie_after_s=zombie_after)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Start the HTTP service: Hugging Face webhook, catalog JSON API and leaderboard page.

    With ``MODELFACTORY_WEBHOOK_SECRET`` set the webhook starts builds on the Prefect server of
    ``PREFECT_API_URL``; without that server it refuses to start (docs/triggers.md).
    """
    import uvicorn

    from modelfactory.interfaces.server import create_app
    from modelfactory.triggers import check_webhook_setup

    with reported_errors():
        if not check_webhook_setup():
            err_console.print("MODELFACTORY_WEBHOOK_SECRET is not set: the webhook refuses every delivery (503); "
                              "serving the catalog API and pages", highlight=False, soft_wrap=True)
    uvicorn.run(create_app(), host=host, port=port, log_level="info")


#: Seconds the CLI lets an ephemeral Prefect server take to start (Prefect's default: 20).
EPHEMERAL_STARTUP_TIMEOUT_S = 120


def main() -> None:
    import os

    # Ephemeral Prefect's telemetry heartbeat races its own SQLite file ("database is locked" noise).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its first start on a machine creates and migrates ~/.prefect/prefect.db: on a 2-core AVX2 machine that
    # ran past Prefect's default 20 s, and a fresh machine's first `make demo` failed ("Timed out while
    # attempting to connect to ephemeral Prefect API server"); the second start took 8 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    app()


if __name__ == "__main__":
    main()
