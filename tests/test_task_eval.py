"""Task accuracy through the real lm-eval: the local PIQA task is lm-eval's piqa on local files,
it scores a real (tiny) model, and a task that cannot run is a clear error before any model loads."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from modelfactory.benchmark.task_data import piqa_rows, piqa_validation
from modelfactory.benchmark.task_eval import (
    LOCAL_TASKS_DIR,
    check_tasks_available,
    evaluate_tasks,
    local_task_names,
)
from modelfactory.core.errors import BenchmarkError, SpecError

lm_eval = pytest.importorskip("lm_eval", reason="the 'eval' extra (lm-eval) is not installed")

#: Keys of lm-eval's piqa.yaml that only say where its data comes from (the local task replaces them).
DATA_LOCATION_KEYS = {"task", "dataset_path", "dataset_name", "training_split", "validation_split", "test_split"}


def _lm_eval_piqa_config() -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml", resolve_func=False)


@pytest.fixture
def data_dir(monkeypatch):
    """Point MODELFACTORY_DATA_DIR elsewhere for one test (settings are cached per process)."""
    from modelfactory.core.settings import get_settings

    def point(path: Path) -> None:
        monkeypatch.setenv("MODELFACTORY_DATA_DIR", str(path))
        get_settings.cache_clear()

    yield point
    monkeypatch.undo()
    get_settings.cache_clear()


def test_local_piqa_is_the_validation_split_with_labels():
    rows = piqa_rows()
    assert len(rows) == 1838
    assert set(rows[0]) == {"goal", "sol1", "sol2", "label"}
    assert {r["label"] for r in rows} == {0, 1}
    assert rows[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and rows[0]["label"] == 0


def test_local_piqa_config_keeps_lm_eval_piqa_prompt_and_metrics():
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = _lm_eval_piqa_config()
    ours = load_yaml(LOCAL_TASKS_DIR / "piqa_local" / "piqa_local.yaml", resolve_func=False)
    assert ours["task"] == "piqa_local" and ours["validation_split"] == "validation"
    assert theirs["validation_split"] == "validation"  # the split the local files hold
    for key in set(theirs) - DATA_LOCATION_KEYS:  # prompt, choices, target, metrics, version: identical
        assert ours[key] == theirs[key], key
    assert set(ours) - set(theirs) == {"custom_dataset"}


def test_prompt_and_requests_match_lm_eval_piqa_for_one_doc():
    """lm-eval's own piqa config, fed the local documents, builds the very same requests as piqa_local."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=False)
    theirs_cfg = {**_lm_eval_piqa_config(), "task": "piqa_reference", "custom_dataset": lambda **_: piqa_validation(),
                  "training_split": None}
    ours = manager.load(["piqa_local"])["tasks"]["piqa_local"]
    theirs = manager.load([theirs_cfg])["tasks"]["piqa_reference"]
    doc = ours.validation_docs()[0]
    assert doc == theirs.validation_docs()[0]
    assert ours.doc_to_text(doc) == theirs.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"
    assert ours.doc_to_choice(doc) == theirs.doc_to_choice(doc) == [doc["sol1"], doc["sol2"]]
    assert ours.doc_to_target(doc) == theirs.doc_to_target(doc) == 0
    ctx = ours.fewshot_context(doc, num_fewshot=0)
    assert ctx == theirs.fewshot_context(doc, num_fewshot=0)
    req_ours = ours.construct_requests(doc, ctx, metadata=("piqa_local", 0, 1))
    req_theirs = theirs.construct_requests(doc, ctx, metadata=("piqa_reference", 0, 1))
    assert [r.args for r in req_ours] == [r.args for r in req_theirs] == [
        (ctx, " " + doc["sol1"]), (ctx, " " + doc["sol2"])]


def test_piqa_local_on_a_real_tiny_model(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert local_task_names() == ["piqa_local"]
    check_tasks_available(["piqa_local"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    result = evaluate_tasks(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_llama), tasks=["piqa_local"],
                            limit=20, device="cpu")
    assert result.lm_eval_version == importlib.metadata.version("lm_eval") and result.limit == 20
    score = result.score("piqa_local")
    assert (score.n_docs, score.n_docs_total) == (20, 1838)
    for value in (score.acc, score.acc_norm):
        assert 0.0 <= value <= 1.0 and (value * 20) == pytest.approx(round(value * 20))  # k correct out of 20
    for value, stderr in ((score.acc, score.acc_stderr), (score.acc_norm, score.acc_norm_stderr)):
        assert stderr == pytest.approx((value * (1 - value) / 19) ** 0.5)  # lm-eval's sample stderr of a mean

    # a model folder instead of a loaded model: lm-eval loads it itself (dtype from its config), same scores
    by_path = evaluate_tasks(model=tiny_llama, tasks=["piqa_local"], limit=20, device="cpu")
    assert by_path.scores == result.scores


def test_unknown_task_is_a_spec_error_naming_close_matches():
    with pytest.raises(SpecError, match=r"unknown lm-eval task 'piqa_locl' \(did you mean .*piqa_local"):
        check_tasks_available(["piqa_locl"])
    with pytest.raises(SpecError, match="no tasks"):
        check_tasks_available([])
    with pytest.raises(SpecError, match="listed twice"):
        check_tasks_available(["piqa_local", "piqa_local"])
    with pytest.raises(SpecError, match="limit"):
        evaluate_tasks(model="unused", tasks=["piqa_local"], limit=0)


def test_missing_local_data_is_a_clear_error(data_dir, tmp_path):
    data_dir(tmp_path)
    with pytest.raises(BenchmarkError, match=r"piqa/valid\.jsonl is missing: put piqa/valid\.jsonl, "
                                             r"piqa/valid-labels\.lst under"):
        check_tasks_available(["piqa_local"])
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(BenchmarkError, match="do not match"):
        check_tasks_available(["piqa_local"])


def test_hub_task_without_its_data_is_a_clear_error(monkeypatch, tmp_path):
    """Offline (as every test runs) and with an empty datasets cache, lm-eval's own piqa cannot fetch
    baber/piqa: an error naming the task and the way out, raised by the availability check."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    with pytest.raises(BenchmarkError) as info:
        check_tasks_available(["piqa"])
    assert "lm-eval task 'piqa' cannot be loaded" in str(info.value) and "piqa_local" in str(info.value)


def _run_logged(step, spec) -> list[str]:
    """*step* called inside a flow with ``log_prints`` on (as the factory's flows are): its log lines."""
    import logging

    from prefect import flow

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    @flow(log_prints=True)
    def wrapper():
        step(spec)

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        wrapper()
    finally:
        logger.removeHandler(handler)
    return lines


def test_the_task_check_logs_no_library_prints_as_its_own(prefect):
    """Loading piqa's data makes ``datasets`` disassemble functions (dill) into a redirected stdout; in a
    flow with ``log_prints`` those prints came out as a page of bytecode in the run's log."""
    from modelfactory.core.specs import TaskEvalSpec
    from modelfactory.tasks.benchmark import check_tasks_task

    def bytecode(lines: list[str]) -> list[str]:
        return [line for line in lines if "RETURN_VALUE" in line or "LOAD_GLOBAL" in line]

    spec = TaskEvalSpec(names=["piqa_local"])
    assert bytecode(_run_logged(check_tasks_task, spec)) == []
    # the control: the same step with prints logged does log them, else the check above proves nothing
    # (if a datasets/dill upgrade stops printing, this test needs another way to reach the print path)
    assert bytecode(_run_logged(check_tasks_task.with_options(log_prints=True), spec)), \
        "loading piqa_local no longer prints bytecode: the control no longer exercises log_prints"
