"""``modelfactory catalog ls/show/compare/best/lineage/upgrade`` in-process (CliRunner) on a seeded
SQLite catalog: filters reach the queries, every format renders, errors exit 1 with the reason."""

from __future__ import annotations

import csv
import inspect
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelfactory.catalog import head_revision, open_catalog
from modelfactory.interfaces.cli.main import app
from modelfactory.testing.catalog import (
    BASE_A,
    LORA_Y,
    SHA_A,
    at_revision,
    catalog_cli,
    seed,
)

runner = CliRunner()


@pytest.fixture
def cli(tmp_path: Path, set_env):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with open_catalog(url) as cat:
        seeded = seed(cat)
    set_env(MODELFACTORY_CATALOG_URL=url, COLUMNS="250")

    return catalog_cli(), seeded, url


def test_ls_filters_sort_and_formats(cli) -> None:
    invoke, seeded, _ = cli
    runs = json.loads(invoke("ls", "--base", BASE_A, "--status", "passed", "--bits", "3", "--format", "json"))
    assert [r["name"] for r in runs] == ["a-3g128-ao", "a-3g128"]
    runs = json.loads(invoke("ls", "--adapter", LORA_Y, "--no-desc-act", "--sort", "speed", "--format", "json"))
    assert [r["name"] for r in runs] == ["a-2g64", "b-4g128"]
    rows = list(csv.DictReader(io.StringIO(invoke("ls", "--since", "2026-01-02", "--until", "2026-01-03",
                                                  "--group-size", "128", "--format", "csv"))))
    assert [r["name"] for r in rows] == ["a-3g128"] and rows[0]["base_sha"] == SHA_A
    table = invoke("ls", "--config", "gptq-8bit-128g")
    assert "a-8g128" in table and "speed-up" in table and "a-4g128" not in table
    assert "is not one of" in invoke("ls", "--status", "done", code=1)
    assert "--sort" in invoke("ls", "--sort", "fastest", code=2)


def test_show_compare_best_lineage(cli) -> None:
    invoke, seeded, _ = cli
    run_id = seeded.ids["a-3g128"]
    assert json.loads(invoke("show", run_id[:8], "--format", "json"))["id"] == run_id
    assert "decode_speedup,delta,1.6,x" in invoke("show", run_id, "--format", "csv")
    compared = invoke("compare", seeded.ids["a-4g128"], run_id)
    assert "(+23.1%)" in compared and "gptq-3bit-128g" in compared
    assert "give 2 to 20 run ids" in invoke("compare", run_id, code=1)
    best = json.loads(invoke("best", "--base", BASE_A, "--max-ppl-increase", "3%", "--format", "json"))
    assert best["best"]["id"] == run_id and best["by"] == "speed"
    assert "★ best: " + run_id in invoke("best", "--base", BASE_A, "--max-ppl-increase", "3%")
    by_size = list(csv.DictReader(io.StringIO(invoke("best", "--base", SHA_A, "--by", "size", "--format", "csv"))))
    assert [r["name"] for r in by_size if r["best"] == "True"] == ["a-3g128-ao"]
    assert "no passing build of 'org/llama-base' within a 0.01% perplexity increase" in invoke(
        "best", "--base", BASE_A, "--max-ppl-increase", "0.01%", code=1)
    chain = invoke("lineage", seeded.manifests["a-3g128"])
    assert "matched manifest" in chain and SHA_A in chain and "publication" in chain
    assert json.loads(invoke("lineage", run_id, "--format", "json"))["nodes"][0]["sha"] == SHA_A
    assert "is no run id, artifact or publication URI" in invoke("lineage", "file:///nowhere", code=1)


def test_every_catalog_command_prints_json_and_csv_when_asked(cli) -> None:
    """Every catalog command that takes ``--format`` prints parseable JSON and CSV, never a table (on the GPU
    machine's typer, ``catalog sweeps --format json`` printed one)."""
    from modelfactory.interfaces.cli.catalog import app as catalog_app

    invoke, seeded, _ = cli
    run_id = seeded.ids["a-3g128"]
    args = {"ls": [], "show": [run_id], "sweeps": [], "compare": [seeded.ids["a-4g128"], run_id],
            "best": ["--base", BASE_A], "lineage": [run_id]}
    with_format = {c.name for c in catalog_app.registered_commands
                   if "format" in inspect.signature(c.callback).parameters}
    assert with_format == set(args), "a catalog command with --format is missing here"
    for command, rest in args.items():
        json.loads(invoke(command, *rest, "--format", "json"))
        header = next(csv.reader(io.StringIO(invoke(command, *rest, "--format", "csv"))))
        assert header and not any(box in ",".join(header) for box in "┃━│"), (command, header)


def test_format_values_read_as_themselves():
    """Typer before 0.29 converts what ``--format``'s parser returns once more, by ``str(value)``: a member
    must read as its value there (a ``(str, Enum)`` member read ``Format.json``, and the command got None)."""
    from modelfactory.interfaces.cli.common import Format

    assert [str(f) for f in Format] == [f.value for f in Format]


def test_ls_and_best_with_the_verdict_bounds(cli) -> None:
    invoke, _, _ = cli
    runs = json.loads(invoke("ls", "--max-kld", "0.05", "--min-task-recovery", "97%", "--sort", "kld",
                             "--format", "json"))
    assert [r["name"] for r in runs] == ["a-8g128", "a-4g32", "a-4g128", "b-4g128"]
    assert [r["name"] for r in json.loads(invoke("ls", "--min-top1", "95", "--base", BASE_A, "--sort", "top1",
                                                 "--format", "json"))] == ["a-8g128", "a-4g32", "a-4g128"]
    table = invoke("ls", "--base", BASE_A, "--sort", "recovery", "--limit", "2")
    assert "KL" in table and "top-1 %" in table and "recovery %" in table and "100.2" in table
    best = json.loads(invoke("best", "--base", BASE_A, "--min-task-recovery", "97%", "--max-kld", "0.05",
                             "--format", "json"))
    assert best["best"]["name"] == "a-4g128" and best["bounds"] == {"max_kld": 0.05, "min_task_recovery": 97.0}
    assert "task recovery >= 97%" in invoke("best", "--base", BASE_A, "--min-task-recovery", "97%")
    assert ("no passing build of 'org/llama-base' within a mean KL divergence <= 0.001 has speed measured: relax "
            "--max-ppl-increase, --max-kld") in invoke("best", "--base", BASE_A, "--max-kld", "0.001", code=1)
    assert "max KL divergence 'low' is not a number" in invoke("ls", "--max-kld", "low", code=1)


def test_upgrade_is_required_for_a_catalog_behind_head(tmp_path: Path, set_env) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with at_revision(url, "0002"):
        pass
    set_env(MODELFACTORY_CATALOG_URL=url)
    refused = runner.invoke(app, ["catalog", "ls"])
    assert refused.exit_code == 1 and "run `modelfactory catalog upgrade`" in refused.output
    upgraded = runner.invoke(app, ["catalog", "upgrade"])
    assert upgraded.exit_code == 0 and f"at revision {head_revision()}" in upgraded.output
    assert runner.invoke(app, ["catalog", "ls", "--format", "json"]).output.strip() == "[]"


def test_client_mistakes_and_an_unreachable_catalog_exit_1_with_the_reason(cli, set_env) -> None:
    """An ambiguous run id prefix is a client mistake (catalog_query, not a catalog failure); an unreachable
    catalog is reported as such by every command, ``catalog import`` too (it raised a traceback)."""
    invoke, seeded, url = cli
    with open_catalog(url) as cat:
        for suffix in ("1", "2"):
            cat.start_run(run_id=f"abcdef-{suffix}", name="x", spec={}, run_key="k")
    for args in (("show", "abcdef"), ("lineage", "abcdef"), ("compare", "abcdef", seeded.ids["a-3g128"])):
        out = invoke(*args, code=1)
        assert "error (catalog_query)" in out and "matches several runs" in out, out
    assert "error (catalog_not_found)" in invoke("show", "abcdef-3", code=1)
    set_env(MODELFACTORY_CATALOG_URL="postgresql+psycopg://factory@127.0.0.1:1/catalog")
    for args in (("ls",), ("show", "abcdef"), ("upgrade",), ("import", "file:///nowhere")):
        out = invoke(*args, code=1)
        assert "error (catalog)" in out and "cannot connect to the catalog" in out, out
