"""The ``modelfactory`` command line, in-process, against the session's Prefect harness."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from modelfactory.interfaces.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _prefect_logging_on_real_streams():
    """Configure Prefect's console log handler before CliRunner swaps sys.stdout/stderr: otherwise
    it keeps the first invocation's (then closed) stream. A real CLI process has one invocation."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


@pytest.fixture(scope="module")
def spec_file(tiny_run, tmp_path_factory):
    """The session's tiny run without its thresholds (flags set them; random weights: no default gate): its
    steps' outputs are reused."""
    path = tmp_path_factory.mktemp("specs") / "tiny.yaml"
    spec = {**{k: v for k, v in tiny_run.spec.items() if k != "gate"}, "gate": {"preset": "none"}}
    path.write_text(yaml.safe_dump({**spec, "name": "cli-tiny"}))
    return path


@pytest.fixture(scope="module")
def cli_runs(spec_file):
    """``modelfactory run`` twice: a passing run (cli-tiny) and one rejected by a flag (cli-reject)."""
    passed = runner.invoke(app, ["run", "--spec", str(spec_file), "--max-ppl-increase-pct", "5"])
    rejected = runner.invoke(app, ["run", "--spec", str(spec_file), "--max-size-ratio", "0.01",
                                   "--name", "cli-reject"])
    return passed, rejected


def test_run_spec_file_passes_and_prints_metrics(cli_runs):
    result, _ = cli_runs
    assert result.exit_code == 0, result.output
    assert "gate: checks in effect: max_ppl_increase_pct=5.0, require_runnable" in result.output
    assert "perplexity" in result.output and "decode_tok_s" in result.output
    assert "passed" in result.output and "artifact: file://" in result.output


def test_a_run_keeps_its_library_logs_in_a_file_named_by_its_run_id(cli_runs, factory_home):
    from modelfactory.testing.catalog import latest_run

    run = latest_run()  # cli-reject, the second run
    assert (factory_home / "logs" / f"run-{run.id}.log").is_file()


LIBRARY_NOISE = {
    "torchao": "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library",
    "torchao.kernel.intmm": "Warning: Detected no triton, on systems without Triton certain kernels will not work",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass ... register_constant() is deprecated",
    "transformers.modeling_utils": "a transformers warning",
}


def test_library_warnings_go_to_the_log_file_and_the_console_keeps_the_factorys_lines(tmp_path):
    """What ``make demo`` printed that newcomers read as errors (torchao's .so load failures, "no triton",
    pytree deprecations, GPTQModel's banner; libraries' loggers, torch's and transformers' own stderr
    handlers, Python warnings) lands in the log file; progress and Prefect lines stay on the console. In a fresh
    interpreter, as the ``modelfactory`` command runs (the routing is process-wide)."""
    import subprocess
    import sys

    code = "\n".join([
        "import logging, sys, warnings",
        "from pathlib import Path",
        "from modelfactory.core.log import progress",
        "from modelfactory.interfaces.cli.library_logs import library_logs",
        "with library_logs('run-x', home=Path(sys.argv[1])):",
        "    import peft  # torchao's import-time warnings, on machines where it has any",
        *(f"    logging.getLogger({name!r}).warning({text!r})" for name, text in LIBRARY_NOISE.items()),
        "    warnings.warn('a library FutureWarning', FutureWarning)",
        "    progress('factory progress line')",
        "    logging.getLogger('prefect.engine').warning('prefect line')",
    ])
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    console = done.stdout + done.stderr
    log = (tmp_path / "logs" / "run-x.log").read_text()
    assert "factory progress line" in console and "prefect line" in console
    for name, text in LIBRARY_NOISE.items():
        assert text not in console and f"{name} - {text}" in log
    assert "a library FutureWarning" not in console and "FutureWarning: a library FutureWarning" in log
    assert "Failed to load" not in console and "triton" not in console and "_pytree" not in console
    assert "GPT-QModel" not in console and "GIL" not in console  # GPTQModel's import-time banner and warnings
    assert "factory progress line" not in log and "prefect line" not in log
    assert f"library warnings and logs of this command: {tmp_path / 'logs' / 'run-x.log'}" in console


def test_every_gate_threshold_has_a_flag_and_the_run_prints_those_in_effect(spec_file):
    from modelfactory.testing.catalog import latest_run

    flags = ["--gate-preset", "default", "--max-ppl-increase-pct", "1000", "--max-kld-mean", "100",
             "--max-kld-p99", "1000", "--min-top1-agreement-pct", "0", "--min-decode-speedup-at", "4=0.001",
             "--require-default-path", "--name", "cli-flags"]
    result = runner.invoke(app, ["run", "--spec", str(spec_file), *flags])
    assert result.exit_code == 0, result.output
    printed = result.output.split("gate: checks in effect: ", 1)[1].splitlines()[0]
    assert printed == ("max_ppl_increase_pct=1000.0, min_decode_speedup_by_batch={4: 0.001}, max_kld_mean=100.0, "
                       "max_kld_p99=1000.0, min_top1_agreement_pct=0.0, require_runnable, require_default_path")
    checked = {check.metric for check in latest_run().gate_checks}
    assert checked == {"max_ppl_increase_pct", "min_decode_speedup_b4", "max_kld_mean", "max_kld_p99",
                       "min_top1_agreement_pct", "require_runnable", "require_default_path"}
    bad = runner.invoke(app, ["run", "--spec", str(spec_file), "--min-decode-speedup-at", "eight=1"])
    assert bad.exit_code == 1 and "--min-decode-speedup-at 'eight=1' is not BATCH=X" in bad.output


def test_flags_override_the_spec_and_rejection_exits_2(cli_runs):
    _, result = cli_runs
    assert result.exit_code == 2, result.output
    assert "rejected" in result.output and "disk size ratio" in result.output


def test_invalid_spec_exits_1_with_the_field(tmp_path, prefect):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"uri": "owner/model"}, "quantize": {"bits": 5}}))
    result = runner.invoke(app, ["run", "--spec", str(bad)])
    assert result.exit_code == 1
    assert "quantize.bits" in result.output and "bits=5" in result.output


def test_catalog_ls_json_and_show(cli_runs):
    result = runner.invoke(app, ["catalog", "ls", "--format", "json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)
    names = {r["name"] for r in runs}
    assert {"cli-tiny", "cli-reject"} <= names
    assert {r["status"] for r in runs if r["name"] == "cli-reject"} == {"rejected"}
    run_id = next(r["id"] for r in runs if r["name"] == "cli-tiny")
    shown = runner.invoke(app, ["catalog", "show", run_id[:8], "--format", "json"])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.output)
    assert detail["id"] == run_id and any(m["name"] == "perplexity" for m in detail["metrics"])
    table = runner.invoke(app, ["catalog", "ls", "--status", "rejected"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "cli-reject" in table.output


def test_catalog_show_unknown_run_exits_1(prefect):
    result = runner.invoke(app, ["catalog", "show", "ffffffffffff"])
    assert result.exit_code == 1 and "catalog ls" in result.output


def test_deploy_command_is_wired():
    result = runner.invoke(app, ["deploy", "--help"])
    assert result.exit_code == 0 and "gpus" in result.output and "zombie" in result.output


# --------------------------------------------------------------------------- `modelfactory deploy` errors
def _deploy_error(result, kind: str) -> str:
    """A deploy failure is a clean message of the error hierarchy: exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a ValueError/RuntimeError
    assert f"error ({kind})" in result.output and "Traceback" not in result.output, result.output
    return result.output


def test_deploy_from_a_checkout_without_deployments_names_the_file_and_the_setting(prefect, tmp_path):
    result = runner.invoke(app, ["deploy"], env={"MODELFACTORY_SOURCE_DIR": str(tmp_path)})
    out = _deploy_error(result, "deploy_source")
    assert str(tmp_path / "deployments" / "prefect.yaml") in out and "MODELFACTORY_SOURCE_DIR" in out


def test_deploy_finds_the_checkout_without_the_setting(monkeypatch):
    from modelfactory.interfaces.deploy import prefect_file

    monkeypatch.delenv("MODELFACTORY_SOURCE_DIR", raising=False)
    assert prefect_file().is_file(), prefect_file()


def test_deploy_onto_a_work_pool_of_another_type_names_both_types(prefect):
    from modelfactory.interfaces.deploy import ensure_work_pool

    ensure_work_pool("gpu", pool_type="process")  # what an earlier `modelfactory deploy` made
    out = _deploy_error(runner.invoke(app, ["deploy", "--pool-type", "kubernetes"]), "work_pool_conflict")
    assert "'gpu'" in out and "'process'" in out and "'kubernetes'" in out


def test_a_failing_prefect_deploy_is_reported_with_its_output(prefect):
    out = _deploy_error(runner.invoke(app, ["deploy", "--name", "no-such-deployment"]), "deploy_command")
    assert "no-such-deployment" in out and "prefect" in out


def test_deploy_refuses_an_unknown_pool_type_before_touching_the_server():
    result = runner.invoke(app, ["deploy", "--pool-type", "docker"])
    assert result.exit_code == 2 and "docker" in result.output  # a usage error: the choices are listed


# --------------------------------------------------------------------------- `modelfactory serve`, for real
def _serve(tmp_path, **env: str):
    from modelfactory.testing.prefect_server import (
        BIN,
        Background,
        child_env,
        free_port,
    )

    port, home = free_port(), tmp_path / "serve"
    proc = Background("modelfactory-serve", [str(BIN / "modelfactory"), "serve", "--port", str(port)],
                      env=child_env(PREFECT_HOME=str(home / "prefect"),  # child_env drops PREFECT_API_URL
                                    MODELFACTORY_CATALOG_URL=f"sqlite:///{tmp_path / 'serve-catalog.db'}", **env),
                      log=home / "serve.log")
    return proc, f"http://127.0.0.1:{port}"


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sigterm_and_collect_survivors(proc, seen: list) -> list:
    """SIGTERM to serve's own pid (as `kill PID` or a supervisor does), then what outlived it."""
    import os
    import signal

    import psutil

    os.kill(proc.proc.pid, signal.SIGTERM)
    proc.proc.wait(timeout=60)
    _gone, alive = psutil.wait_procs(seen, timeout=10)
    for survivor in alive:  # do not leave them running on the machine: this test found them
        survivor.kill()
    return alive


def test_serve_with_a_webhook_secret_but_no_prefect_server_refuses_and_leaves_nothing_behind(tmp_path):
    """The bug: the first watched delivery started an ephemeral Prefect server (uvicorn) that outlived
    `serve` after SIGTERM. Now `serve` refuses webhook triggers without a Prefect server, at start."""
    import httpx

    from modelfactory.catalog import open_catalog
    from modelfactory.testing.prefect_server import wait_for

    open_catalog(f"sqlite:///{tmp_path / 'serve-catalog.db'}").add_watch(
        repo="mf-test/orphan-lora", kind="adapter", base="mf-test/base")
    serve, url = _serve(tmp_path, MODELFACTORY_WEBHOOK_SECRET="orphan-test-secret")
    serve.start()
    seen: list = []
    try:
        def exited_or_up() -> bool:
            if not serve.alive():
                return True
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200

        wait_for("modelfactory serve to answer or exit", exited_or_up, timeout=90, diagnostics=serve.tail)
        if serve.alive():  # the old behaviour: it served; a watched delivery then reached Prefect
            sha = "c" * 40
            httpx.post(f"{url}/hooks/huggingface", timeout=120, headers={"X-Webhook-Secret": "orphan-test-secret"},
                       json={"event": {"action": "update", "scope": "repo.content"},
                             "repo": {"type": "model", "name": "mf-test/orphan-lora", "headSha": sha},
                             "updatedRefs": [{"ref": "refs/heads/main", "newSha": sha}]})
            seen = _descendants(serve.proc.pid)
            survivors = _sigterm_and_collect_survivors(serve, seen)
            assert not survivors, f"outlived `modelfactory serve`: {[p.cmdline() for p in survivors]}"
        serve.proc.wait(timeout=30)
        log = serve.log.read_text()
        assert serve.proc.returncode == 1, log
        assert "PREFECT_API_URL" in log and "MODELFACTORY_WEBHOOK_SECRET" in log and "Traceback" not in log, log
        assert "orphan-test-secret" not in log
    finally:
        serve.stop()


def test_serve_without_a_webhook_secret_serves_the_catalog_and_stops_cleanly(tmp_path):
    """No secret, no Prefect server: the catalog API and pages work; the webhook refuses (503); SIGTERM
    ends it without leaving a process behind."""
    import httpx

    from modelfactory.testing.prefect_server import wait_for

    serve, url = _serve(tmp_path)
    serve.start()
    try:
        wait_for("modelfactory serve", lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
                 timeout=90, diagnostics=serve.tail)
        assert httpx.get(f"{url}/api/runs", timeout=30).status_code == 200
        page = httpx.get(f"{url}/leaderboard", timeout=30)
        assert page.status_code == 200 and "No finished builds" in page.text
        hook = httpx.post(f"{url}/hooks/huggingface", json={}, headers={"X-Webhook-Secret": ""}, timeout=30)
        assert hook.status_code == 503 and hook.json()["status"] == "error"
        seen = _descendants(serve.proc.pid)
        assert not _sigterm_and_collect_survivors(serve, seen)
        assert "Traceback" not in serve.log.read_text(), serve.tail()
    finally:
        serve.stop()


# --------------------------------------------------------------------------- one --format for every command
@pytest.fixture
def own_catalog(tmp_path, set_env):
    from modelfactory.catalog import open_catalog

    url = f"sqlite:///{tmp_path / 'formats.db'}"
    set_env(MODELFACTORY_CATALOG_URL=url)
    with open_catalog(url) as catalog:
        yield catalog


def test_format_takes_one_set_of_values_everywhere_and_the_old_ones_still_work(own_catalog, tmp_path):
    import csv
    import io

    own_catalog.add_watch(repo="mf-test/fmt-lora", kind="adapter", base="mf-test/base", spec={"gate": {
        "max_ppl_increase_pct": 5.0}})
    (row,) = json.loads(runner.invoke(app, ["watch", "ls", "--format", "json"]).stdout)
    assert row["repo"] == "mf-test/fmt-lora" and row["spec"] == {"gate": {"max_ppl_increase_pct": 5.0}}
    (line,) = csv.DictReader(io.StringIO(runner.invoke(app, ["watch", "ls", "--format", "csv"]).stdout))
    assert line["repo"] == "mf-test/fmt-lora" and json.loads(line["spec"]) == row["spec"] and line["last_sha"] == ""
    table = runner.invoke(app, ["watch", "ls", "--format", "table"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "mf-test/fmt-lora" in table.output
    assert runner.invoke(app, ["catalog", "ls", "--format", "csv"]).stdout.startswith("id,name,status")

    missing = str(tmp_path / "no-artifact")
    for fmt in ("text", "table", "json"):  # `artifact` took text|json before: text still means the table
        result = runner.invoke(app, ["artifact", "verify", missing, "--format", fmt])
        assert result.exit_code == 1 and "error (" in result.output and "Traceback" not in result.output, result.output
    for args in (["artifact", "verify", missing], ["watch", "ls"], ["catalog", "ls"], ["run"]):
        refused = runner.invoke(app, [*args, "--format", "yaml"])
        assert refused.exit_code == 2 and "'yaml' is not one of" in refused.output, refused.output
    refused = runner.invoke(app, ["artifact", "verify", missing, "--format", "csv"])  # one summary: no csv
    assert refused.exit_code == 2 and "table, json" in refused.output


def test_watch_add_with_an_unknown_kind_names_the_kinds(own_catalog):
    result = runner.invoke(app, ["watch", "add", "mf-test/kind-lora", "--base", "mf-test/base", "--kind", "lora"])
    assert result.exit_code == 1 and "'lora'" in result.output and "'adapter' or 'base'" in result.output
    assert own_catalog.list_watches() == []


def test_the_cli_gives_an_ephemeral_prefect_server_time_to_make_its_database():
    """A fresh machine's first ``make demo`` creates and migrates Prefect's database: past Prefect's 20 s
    default on a slow 2-core machine. The CLI sets a longer one before Prefect reads its settings (in a
    fresh interpreter, as the ``modelfactory`` command runs); a value the user set is kept."""
    import os
    import subprocess
    import sys

    probe = ("import modelfactory.interfaces.cli.main as cli; cli.app = lambda: None; cli.main(); "
             "from prefect.settings import get_current_settings as s; "
             "print(s().server.ephemeral.startup_timeout_seconds)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    for given, expected in ((None, "120"), ("300", "300")):
        run_env = env if given is None else {**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": given}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected, out.stderr[-2000:]
