"""A watch's builds without servers: the one rule that makes a build a factory run or a sweep
(``modelfactory/triggers/watch.py``: ``is_sweep``, ``spec_for_commit``, ``validate_watch``) and the CLI that
adds and lists sweep watches. The webhook → sweep → catalog path, for real: ``test_triggers.py``."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from modelfactory.catalog import open_catalog
from modelfactory.catalog.records import WatchRecord
from modelfactory.core.errors import SpecError
from modelfactory.core.specs import FactorySpec
from modelfactory.core.sweep_spec import SweepSpec
from modelfactory.interfaces.cli.main import app
from modelfactory.testing.env import REPO
from modelfactory.triggers import is_sweep, spec_for_commit, validate_watch

SHA = "c" * 40
BASE = "meta-llama/Llama-2-7b-hf"
EXAMPLE = REPO / "examples" / "watch-sweep.yaml"
runner = CliRunner()


def watch(spec: dict, *, kind: str = "adapter", repo: str = "me/my-lora") -> WatchRecord:
    return WatchRecord(repo=repo, kind=kind, base=BASE if kind == "adapter" else None, revision="main", spec=spec,
                       last_sha=None)


# --------------------------------------------------------------------------- the rule
def test_grid_or_configs_make_a_build_a_sweep_and_nothing_else_does():
    assert is_sweep({"grid": {"group_size": [128, 64]}}) and is_sweep({"configs": [{"group_size": 64}]})
    assert is_sweep({"grid": {}})  # an empty grid is one configuration, still a sweep
    assert not is_sweep({}) and not is_sweep({"quantize": {"group_size": 64}, "gate": {"max_ppl_increase_pct": 5}})
    assert not is_sweep({"grid": None, "configs": None})
    assert not is_sweep({"objective": "speed"})  # refused by spec_for_commit, below


def test_a_sweep_watch_builds_the_pushed_commit_as_a_sweep_with_the_watch_sources():
    spec = spec_for_commit(watch=watch(yaml.safe_load(EXAMPLE.read_text())), sha=SHA)
    assert isinstance(spec, SweepSpec)
    assert spec.name == "me--my-lora" and spec.base.uri == BASE
    assert [(a.uri, a.revision) for a in spec.adapters] == [("hf://me/my-lora", SHA)]
    assert [m.label for m in spec.members()] == [
        "gptq-4bit-128g", "gptq-4bit-128g-actorder", "gptq-4bit-64g", "gptq-4bit-64g-actorder"]
    assert spec.objective == "speed" and spec.publish_mode == "winner" and spec.gate.max_ppl_increase_pct == 5

    base = spec_for_commit(watch=watch({"configs": [{"group_size": 64}, {"group_size": 32}]}, kind="base",
                                       repo="org/new-base"), sha=SHA)
    assert isinstance(base, SweepSpec) and (base.base.uri, base.base.revision) == ("hf://org/new-base", SHA)
    assert base.adapters == () and base.objective == "quality"  # SweepSpec's defaults


def test_a_watch_without_configurations_still_builds_one_factory_run():
    spec = spec_for_commit(watch=watch({"quantize": {"group_size": 64}}), sha=SHA)
    assert type(spec) is FactorySpec and spec.quantize.group_size == 64
    assert [(a.uri, a.revision) for a in spec.adapters] == [("hf://me/my-lora", SHA)]


@pytest.mark.parametrize("fields", [{"objective": "speed"}, {"publish_mode": "all_passing"},
                                    {"kernels": ["gptq_torch"], "objective": "size"}])
def test_sweep_only_fields_without_configurations_are_refused_saying_what_to_do(fields):
    with pytest.raises(SpecError) as error:
        validate_watch(repo="me/my-lora", kind="adapter", base=BASE, fields=fields)
    message = str(error.value)
    assert all(name in message for name in fields) and "no `grid` or `configs`" in message
    assert "configs: [{}]" in message and "plain factory run" in message


def test_configs_of_the_template_alone_sweep_its_kernels():
    spec = validate_watch(repo="me/my-lora", kind="adapter", base=BASE,
                          fields={"configs": [{}], "kernels": ["gptq_torch", "gptq_triton"]})
    assert isinstance(spec, SweepSpec) and [m.kernel for m in spec.members()] == ["gptq_torch", "gptq_triton"]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"grid": {"group_size": [128]}, "configs": [{}]}, "either `grid` or `configs`"),
    ({"grid": {"group_size": [100]}}, "group_size=100 is not supported"),
    ({"grid": {"bits": [4]}, "objective": "fastest"}, "objective"),
    ({"grid": {"bits": [4]}, "adapters": [{"uri": "me/other"}]}, "sources come from the watch itself"),
    ({"configs": [{"group_size": 64}], "base": {"uri": "org/other"}}, "base.uri"),
    ({"grid": {"bits": [4]}, "colour": "blue"}, "colour"),
])
def test_a_bad_sweep_watch_is_refused_with_the_factory_s_messages(fields, expected):
    with pytest.raises(SpecError, match="watch") as error:
        validate_watch(repo="me/my-lora", kind="adapter", base=BASE, fields=fields)
    assert expected in str(error.value)


# --------------------------------------------------------------------------- the CLI
def test_watch_add_takes_a_sweep_spec_file_and_ls_shows_the_watch_sweeps(tmp_path):
    added = runner.invoke(app, ["watch", "add", "mf-test/sweep-cli", "--base", BASE, "--spec", str(EXAMPLE)])
    assert added.exit_code == 0, added.output
    assert "sweep of 4 configurations (objective speed, publish winner)" in added.output
    runner.invoke(app, ["watch", "add", "mf-test/run-cli", "--base", BASE, "--group-size", "64"])
    stored = open_catalog().get_watch("mf-test/sweep-cli").spec
    assert stored["grid"] == {"group_size": [128, 64], "desc_act": [False, True]} and stored["objective"] == "speed"

    rows = {r["repo"]: r for r in json.loads(runner.invoke(app, ["watch", "ls", "--format", "json"]).stdout)}
    assert (rows["mf-test/sweep-cli"]["build"], rows["mf-test/sweep-cli"]["configurations"]) == ("sweep", 4)
    assert (rows["mf-test/run-cli"]["build"], rows["mf-test/run-cli"]["configurations"]) == ("run", 1)
    table = runner.invoke(app, ["watch", "ls"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "sweep of 4" in table.output, table.output
    csv_text = runner.invoke(app, ["watch", "ls", "--format", "csv"]).stdout
    assert csv_text.splitlines()[0].startswith("repo,kind,base,revision,last_sha,build,configurations,spec")

    # A sweep spec file with its own sources is refused (they come from the watch), as is an objective alone.
    full = yaml.safe_load((REPO / "examples" / "sweep.yaml").read_text())
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    refused = runner.invoke(app, ["watch", "add", "mf-test/full", "--base", BASE, "--spec", str(tmp_path / "full.yaml")])
    assert refused.exit_code == 1 and "base.uri" in refused.output and "Traceback" not in refused.output
    (tmp_path / "objective.yaml").write_text("objective: speed\n")
    refused = runner.invoke(app, ["watch", "add", "mf-test/obj", "--base", BASE, "--spec",
                                  str(tmp_path / "objective.yaml")])
    assert refused.exit_code == 1 and "no `grid` or `configs`" in refused.output
    assert {w.repo for w in open_catalog().list_watches()} == {"mf-test/sweep-cli", "mf-test/run-cli"}
