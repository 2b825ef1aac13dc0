"""The sweep flow on the tiny random Llama, in-process (Prefect harness, SQLite catalog, file store):
merged once, fp16 measured once, three configurations recorded as one sweep, the objective's
winner published; all-passing and impossible-gate publish modes; a failing member; the CLI.

Budget: ~3 min on 2 cores (four tiny quantizations, one fp16 and four GPTQ benchmarks; the
later sweeps reuse the first one's outputs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from modelfactory.catalog import open_catalog
from modelfactory.core.errors import SpecError
from modelfactory.core.hashing import step_key
from modelfactory.core.manifest import verify_folder
from modelfactory.core.settings import get_settings
from modelfactory.core.sweep_spec import SweepSpec
from modelfactory.interfaces.cli.main import app
from modelfactory.interfaces.runner import run_factory, run_sweep
from modelfactory.publishing.local import local_root
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import make_lora, tiny_spec

STEPS = ["download", "merge", "quantize", "runnability", "benchmark", "gate"]
#: Three configurations of the tiny model (hidden 64, MLP 128: every size divides them).
CONFIGS = [{"group_size": 32}, {"group_size": 64}, {"bits": 8, "group_size": 32}]
LABELS = ["gptq-4bit-32g", "gptq-4bit-64g", "gptq-8bit-32g"]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _own_work_dir(factory_home, tmp_path_factory) -> Any:
    """Outputs of other modules must not be reused: this module counts what the sweep builds."""
    with own_work_dir(tmp_path_factory.mktemp("sweep-work")) as path:
        yield path


@pytest.fixture(scope="module", autouse=True)
def _prefect_logging_on_real_streams():
    """Prefect's console handler set up before CliRunner swaps the streams (as in test_cli.py)."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


@pytest.fixture(scope="module")
def tiny_lora(tiny_llama, tmp_path_factory) -> Path:
    return make_lora(tiny_llama, tmp_path_factory.mktemp("sweep-lora"))


def sweep_spec(tiny_llama: Path, tiny_lora: Path, name: str, **fields: Any) -> dict[str, Any]:
    """The tiny spec's budgets as a sweep over :data:`CONFIGS`, gated loosely (the random model passes)."""
    base = tiny_spec(tiny_llama)
    spec = {"name": name, "base": base["base"], "adapters": [{"uri": str(tiny_lora)}],
            "quantize": base["quantize"], "benchmark": base["benchmark"], "configs": CONFIGS,
            "gate": {"preset": "none", "max_ppl_increase_pct": 50.0}, "objective": "size", "publish": {"name": name}}
    return {**spec, **fields}


def work_outputs(step: str) -> list[Path]:
    """Finished outputs of *step* in this module's work dir."""
    root = get_settings().resolved_work_dir / step
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


@pytest.fixture(scope="module")
def swept(prefect, tiny_llama, tiny_lora):
    return run_sweep(sweep_spec(tiny_llama, tiny_lora, "sweep-a"))


def test_sweep_merges_once_measures_fp16_once_and_publishes_the_smallest(swept):
    assert [m.label for m in swept.members] == LABELS
    assert all(m.status == "passed" for m in swept.members), swept
    assert len(work_outputs("merge")) == 1 and len(work_outputs("benchmark-fp16")) == 1
    assert len(work_outputs("quantize")) == 3 and len(work_outputs("benchmark")) == 3
    assert swept.baseline_path and not swept.baseline_reused

    catalog = open_catalog()
    detail = catalog.get_sweep(swept.sweep_id)
    assert detail.status == "finished" and detail.objective == "size" and detail.publish_mode == "winner"
    assert [m.label for m in detail.members] == LABELS and [m.position for m in detail.members] == [0, 1, 2]
    assert detail.base_uri and detail.base_sha
    # The winner is the smallest passing configuration, as recorded.
    smallest = min(detail.members, key=lambda m: m.size_ratio)
    assert swept.winner_label == smallest.label and detail.winner_run_id == smallest.run_id == swept.winner_run_id
    assert detail.winner is not None and detail.winner.label == smallest.label
    assert set(detail.front) == {m.run_id for m in detail.members if m.label in swept.front}
    assert smallest.label in swept.front and all(m.on_front == (m.label in swept.front) for m in detail.members)

    fp16 = set()
    for member in detail.members:
        run = catalog.get_run(member.run_id)
        assert run.status == "passed" and member.status == "passed"
        names = [s.name for s in run.steps]
        assert names == (STEPS + ["publish"] if member.run_id == swept.winner_run_id else STEPS), names
        assert run.spec["publish"]["revision"] == member.label  # its own branch
        fp16.add(run.value("perplexity", "fp16"))  # one measurement, shared
        assert (len(run.artifacts) == 1) == (member.run_id == swept.winner_run_id)
    assert len(fp16) == 1

    (artifact,) = catalog.get_run(swept.winner_run_id).artifacts
    assert swept.winner.published and swept.winner.artifact_uri == artifact.uri
    manifest = verify_folder(local_root(artifact.uri))
    assert manifest["spec"]["quantize"]["group_size"] == smallest.group_size


def test_catalog_show_prints_the_sweep_matrix(swept):
    result = runner.invoke(app, ["catalog", "show", swept.sweep_id[:8]], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert all(label in result.output for label in LABELS)
    assert "objective size" in result.output and "winner" in result.output  # (the table wraps the label)
    shown = json.loads(runner.invoke(app, ["catalog", "show", swept.sweep_id, "--format", "json"]).stdout)
    assert shown["winner_run_id"] == swept.winner_run_id and len(shown["members"]) == 3


def test_all_passing_publishes_each_on_its_own_label(swept, tiny_llama, tiny_lora):
    outcome = run_sweep(sweep_spec(tiny_llama, tiny_lora, "sweep-all", publish_mode="all_passing",
                                   objective="quality"))
    assert outcome.baseline_reused  # the first sweep's fp16 side, and its builds, reused
    assert len(work_outputs("benchmark-fp16")) == 1 and len(work_outputs("quantize")) == 3
    assert all(m.status == "passed" and m.published for m in outcome.members), outcome
    assert len({m.artifact_uri for m in outcome.members}) == 3
    catalog = open_catalog()
    for member in outcome.members:
        run = catalog.get_run(member.run_id)
        assert run.spec["publish"]["revision"] == member.label and run.artifacts[0].uri == member.artifact_uri
        assert {s.name: s.status for s in run.steps}["quantize"] == "reused"
    detail = catalog.get_sweep(outcome.sweep_id)
    assert detail.publish_mode == "all_passing" and detail.winner_run_id == outcome.winner_run_id


def test_impossible_gate_publishes_nothing_and_finishes_without_a_winner(swept, tiny_llama, tiny_lora):
    store = local_root(get_settings().resolved_store_url)
    before = sorted(store.rglob("*"))
    outcome = run_sweep(sweep_spec(tiny_llama, tiny_lora, "sweep-none", gate={"max_size_ratio": 0.01}))
    assert outcome.winner_label is None and outcome.front == ()
    assert [m.status for m in outcome.members] == ["rejected"] * 3 and not any(m.published for m in outcome.members)
    detail = open_catalog().get_sweep(outcome.sweep_id)
    assert detail.status == "finished" and detail.winner_run_id is None and detail.front == ()
    assert all(m.status == "rejected" for m in detail.members)
    assert sorted(store.rglob("*")) == before


def test_a_failing_member_is_recorded_and_the_others_finish(swept, tiny_llama, tiny_lora, tmp_path):
    broken = {"group_size": 64, "calibration": {"text": {"path": str(tmp_path / "missing.txt")}}}
    outcome = run_sweep(sweep_spec(tiny_llama, tiny_lora, "sweep-broken", configs=[CONFIGS[0], broken]))
    first, second = outcome.members
    assert first.status == "passed" and outcome.winner_label == first.label and first.published
    assert second.status == "failed" and "missing.txt" in second.error
    detail = open_catalog().get_sweep(outcome.sweep_id)
    assert detail.status == "finished" and [m.status for m in detail.members] == ["passed", "failed"]
    failed = open_catalog().get_run(second.run_id)
    assert failed.status == "failed" and "missing.txt" in failed.error


def test_a_member_that_raises_leaves_no_other_member_running(swept, tiny_llama, tiny_lora, monkeypatch):
    """Issue 24.4: one member's future raised (here: its run could not even be started) and the members that
    had passed stayed ``running`` in the catalog forever. Now each member closes its own run."""
    import modelfactory.flows.sweep as sweep_flow

    real_start = sweep_flow.RunRecorder.start

    def start(**kwargs):
        if kwargs["name"].endswith("gptq-4bit-64g"):
            raise RuntimeError("the catalog refused this member's run")
        return real_start(**kwargs)

    monkeypatch.setattr(sweep_flow.RunRecorder, "start", staticmethod(start))
    with pytest.raises(RuntimeError, match="refused this member's run"):
        run_sweep(sweep_spec(tiny_llama, tiny_lora, "sweep-raises"))
    catalog = open_catalog()
    (detail,) = [s for s in catalog.list_sweeps() if s.name == "sweep-raises"]
    assert detail.status == "failed" and "refused this member's run" in detail.error
    members = catalog.get_sweep(detail.id).members
    assert [m.label for m in members] == [LABELS[0], LABELS[2]]
    assert [catalog.get_run(m.run_id).status for m in members] == ["passed", "passed"]  # closed, none left running


def test_a_sweep_member_publishes_inside_its_run_key_claim(swept, tiny_llama, tiny_lora, monkeypatch):
    """Issue 24.3: a sweep published after its members had released their claims, while a plain run publishes
    inside its claim (so an identical run waiting for the key never overlaps the publication)."""
    import modelfactory.flows.sweep as sweep_flow
    from modelfactory.catalog import claims

    held_while_publishing: list[bool] = []
    real_publish = sweep_flow.publish_task

    def publish(spec, *args, **kwargs):
        held_while_publishing.append(claims.current(open_catalog(), step_key("run", spec=spec)) is not None)
        return real_publish(spec, *args, **kwargs)

    monkeypatch.setattr(sweep_flow, "publish_task", publish)
    outcome = run_sweep(sweep_spec(tiny_llama, tiny_lora, "sweep-claimed"))
    assert outcome.winner is not None and outcome.winner.published
    assert held_while_publishing == [True]


def test_a_member_on_another_card_class_measures_the_fp16_side_there(prefect, tiny_llama, monkeypatch):
    """Issue 24.4, the mixed-card policy: the fp16 baseline's key names the host's GPU, so on a mixed H100/H200
    pool every member landing on the other card failed ('measured on another kind of host'). The GPU stage
    now measures the fp16 side once per card class and compares the member with that one."""
    import modelfactory.tasks.benchmark as benchmark_step
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import BenchmarkSpec, QuantSpec
    from modelfactory.flows.gpu_stage import gpu_stage

    real = benchmark_step._host_fingerprint
    card = {"gpu": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(benchmark_step, "_host_fingerprint", lambda spec: {**real(spec), **card})
    base = tiny_spec(tiny_llama)
    model = ModelArtifact(path=str(tiny_llama), sha="tiny-mixed-cards", source_uri=str(tiny_llama), kind="merged")
    bench = BenchmarkSpec.model_validate(base["benchmark"])
    h100 = benchmark_step.benchmark_baseline(model=model, spec=bench)  # the sweep's baseline, on an H100
    card["gpu"] = "NVIDIA H200"  # the member's stage lands on an H200 worker
    outcome = gpu_stage(model=model, quantize=QuantSpec.model_validate(base["quantize"]), benchmark=bench,
                        baseline=h100)
    assert outcome.error_type is None and outcome.benchmark is not None
    assert outcome.benchmark.baseline_path != h100.path  # measured on this card class, not the H100's
    assert benchmark_step.benchmark_baseline(model=model, spec=bench).reused  # and reused by the next H200 member


def test_a_sweep_of_one_configuration_is_a_plain_run(swept, tiny_llama, tiny_lora):
    data = sweep_spec(tiny_llama, tiny_lora, "sweep-one", configs=[CONFIGS[1]])
    outcome = run_sweep(data)
    (member,) = outcome.members
    assert member.status == "passed" and outcome.winner_label == member.label == "gptq-4bit-64g" and member.published
    swept_run = open_catalog().get_run(member.run_id)
    assert [s.name for s in swept_run.steps] == STEPS + ["publish"]
    # The plain factory on the member's spec does the same: every step reused, the same verdict.
    spec = SweepSpec.model_validate(data)
    (only,) = spec.members()
    plain = run_factory(spec.member_spec(only))
    assert plain.status == "passed"
    plain_run = open_catalog().get_run(plain.run_id)
    assert {s.name: s.status for s in plain_run.steps}["quantize"] == "reused"
    assert {s.name: s.status for s in plain_run.steps}["benchmark"] == "reused"
    for name in ("ppl_increase_pct", "size_ratio", "decode_speedup"):
        assert plain_run.value(name, "delta") == swept_run.value(name, "delta"), name


def test_cli_sweep_prints_the_matrix_and_exits_by_the_verdict(swept, tiny_llama, tiny_lora, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_spec(tiny_llama, tiny_lora, "sweep-cli", configs=CONFIGS[:2])))
    result = runner.invoke(app, ["sweep", "--spec", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "gptq-4bit-32g" in result.output and "gptq-4bit-64g" in result.output and "winner" in result.output

    path.write_text(yaml.safe_dump(sweep_spec(tiny_llama, tiny_lora, "sweep-cli-rejected", configs=CONFIGS[:1],
                                              gate={"max_size_ratio": 0.01})))
    rejected = runner.invoke(app, ["sweep", "--spec", str(path), "--format", "json"])
    assert rejected.exit_code == 2, rejected.output
    assert json.loads(rejected.stdout)["winner_run_id"] is None

    path.write_text(yaml.safe_dump({"base": {"uri": "owner/model"}, "grid": {"bits": [5]}}))
    bad = runner.invoke(app, ["sweep", "--spec", str(path)])
    assert bad.exit_code == 1 and "invalid spec in" in bad.output and "bits" in bad.output


def test_invalid_sweep_spec_is_a_spec_error(prefect):
    with pytest.raises(SpecError, match="not both"):
        run_sweep({"base": {"uri": "owner/model"}, "grid": {"bits": [4]}, "configs": [{"bits": 8}]})


def test_example_sweep_spec_is_valid():
    from modelfactory.testing.env import REPO

    spec = SweepSpec.model_validate(yaml.safe_load((REPO / "examples" / "sweep.yaml").read_text()))
    assert len(spec.members()) >= 2
