"""The ``modelfactory`` command line, in-process, against the session's Prefect harness."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_spec
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
def spec_file(prefect, tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tiny_llama, name="cli-tiny")))
    return path


def test_run_spec_file_passes_and_prints_metrics(spec_file):
    result = runner.invoke(app, ["run", "--spec", str(spec_file), "--max-ppl-increase-pct", "5"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "decode_tok_s" in result.output
    assert "passed" in result.output and "artifact: file://" in result.output


def test_flags_override_the_spec_and_rejection_exits_2(spec_file):
    result = runner.invoke(app, ["run", "--spec", str(spec_file), "--max-size-ratio", "0.01", "--name", "cli-reject"])
    assert result.exit_code == 2, result.output
    assert "rejected" in result.output and "disk size ratio" in result.output


def test_invalid_spec_exits_1_with_the_field(tmp_path, prefect):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"uri": "owner/model"}, "quantize": {"bits": 5}}))
    result = runner.invoke(app, ["run", "--spec", str(bad)])
    assert result.exit_code == 1
    assert "quantize.bits" in result.output and "bits=5" in result.output


def test_catalog_ls_json_and_show(spec_file):
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
