"""Each factory run leaves a Prefect markdown artifact (key ``run-<id8>``) with its metrics table,
created by ``RunRecorder`` when the run finishes or fails; read back through the Prefect client."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from prefect import flow, runtime

from modelfactory.catalog import MetricRecord
from modelfactory.core.records import GateCheck
from modelfactory.tasks.record import RunRecorder, artifact_key


def read_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert len(found) == 1, found
    return found[0]


@flow(name="catalog-artifact-test")
def recorded_run(run_id: str, catalog_url: str, fail: bool = False) -> str:
    recorder = RunRecorder.start(run_id=run_id, name="artifact-test", spec={"quantize": {"bits": 4}},
                                 run_key="artifact-key", flow_run_id=str(runtime.flow_run.id),
                                 catalog_url=catalog_url)
    if fail:
        recorder.fail(RuntimeError("quantizer exploded"))
        return str(runtime.flow_run.id)
    recorder.catalog.record_metrics(run_id=run_id, metrics=[
        MetricRecord("perplexity", "fp16", 20.0, "ppl"), MetricRecord("perplexity", "gptq", 20.4, "ppl"),
        MetricRecord("ppl_increase_pct", "delta", 2.0, "%")])
    recorder.catalog.record_gate(run_id=run_id, checks=[
        GateCheck(metric="max_ppl_increase_pct", threshold=5.0, baseline=20.0, candidate=20.4, observed=2.0,
                  passed=True, message="ok")])
    recorder.finish("passed")
    return str(runtime.flow_run.id)


def test_finished_run_leaves_a_markdown_metrics_artifact(prefect, tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    flow_run_id = recorded_run(run_id, f"sqlite:///{tmp_path / 'catalog.db'}")
    artifact = read_artifact(artifact_key(run_id))
    assert artifact.key == f"run-{run_id[:8]}" and artifact.type == "markdown"
    assert str(artifact.flow_run_id) == flow_run_id
    assert f"run `{run_id}`" in artifact.data and "**passed**" in artifact.data
    assert "| perplexity | 20 | 20.4 |" in artifact.data and "| max_ppl_increase_pct | 5 | 2 | yes |" in artifact.data


def test_failed_run_leaves_one_too(prefect, tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    recorded_run(run_id, f"sqlite:///{tmp_path / 'catalog.db'}", fail=True)
    artifact = read_artifact(artifact_key(run_id))
    assert "**failed**" in artifact.data and "quantizer exploded" in artifact.data


@pytest.mark.parametrize(("run_id", "key"), [("0C0FFEE0-1234", "run-0c0ffee0"), ("ab_cd.ef-99", "run-ab-cd-ef")])
def test_artifact_keys_are_valid_prefect_keys(run_id: str, key: str) -> None:
    assert artifact_key(run_id) == key
