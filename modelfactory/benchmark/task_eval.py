"""Task accuracy through lm-evaluation-harness (the ``eval`` extra: ``pip install -e '.[eval]'``).

Both sides are evaluated the same way: the already loaded model (fp16, or GPTQ through the
benchmark's own kernel selection) is wrapped in lm-eval's HF model class
(``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)``) and run through
``lm_eval.simple_evaluate`` — lm-eval's own prompts, scoring and stderr; nothing is re-implemented.

Tasks are lm-eval task names. Besides lm-eval's own (which fetch their data from the Hub, so
they need a machine that is online or a filled datasets cache), the repo ships task configs
under ``lm_eval_tasks/`` that read local copies from ``MODELFACTORY_DATA_DIR``
(:data:`LOCAL_TASKS_DIR`): ``piqa_local`` is lm-eval's ``piqa`` on the local validation split.
Call :func:`check_tasks_available` before any heavy work: an unknown name or data that cannot be
had is a clear error there, not after a model was loaded.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import math
import time
from collections.abc import Sequence
from pathlib import Path

from modelfactory.core.errors import BenchmarkError, ModelFactoryError, SpecError
from modelfactory.core.records import Record

#: Task configs shipped with the repo (lm-eval YAML + the small loaders they name).
LOCAL_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


class TaskScore(Record):
    """One lm-eval task (or group) on one model: accuracy, length-normalized accuracy, their stderr."""

    task: str
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    #: Documents evaluated (after ``limit``) and in the task's split; None for a group's aggregate row.
    n_docs: int | None
    n_docs_total: int | None


class TaskEvalResult(Record):
    lm_eval_version: str
    limit: int | None
    scores: tuple[TaskScore, ...]
    duration_s: float

    def score(self, task: str) -> TaskScore:
        for s in self.scores:
            if s.task == task:
                return s
        raise KeyError(task)


def local_task_names() -> list[str]:
    """Names of the task configs under :data:`LOCAL_TASKS_DIR` (e.g. ``piqa_local``)."""
    return sorted(_task_manager(include_defaults=False).all_tasks)


@functools.lru_cache(maxsize=2)
def _task_manager(*, include_defaults: bool):
    """lm-eval's task index with the repo's local tasks; without lm-eval's own ~15k configs when
    every requested task is local (scanning them takes ~10 s)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise BenchmarkError("lm-eval is not installed, so task accuracy cannot be measured: install the "
                             "'eval' extra (pip install -e '.[eval]'; make setup does)") from exc
    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def _manager_for(tasks: Sequence[str]):
    local = set(_task_manager(include_defaults=False).all_tasks)
    return _task_manager(include_defaults=not set(tasks) <= local)


def check_tasks_available(tasks: Sequence[str]) -> None:
    """Fail fast (before any model is loaded) when a task is unknown or its data cannot be had.

    Each task is built by lm-eval, which loads its documents (local files or the Hub / the datasets
    cache), so a task that passes here has its data on this machine.
    Raises :class:`SpecError` for an unknown name, :class:`BenchmarkError` for missing data.
    """
    if not tasks:
        raise SpecError("no tasks to evaluate: list lm-eval task names, e.g. ['piqa_local']")
    if len(set(tasks)) != len(tasks):
        raise SpecError(f"tasks listed twice: {sorted(t for t in set(tasks) if list(tasks).count(t) > 1)}")
    manager = _manager_for(tasks)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise SpecError(f"unknown lm-eval task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; local tasks (offline data): {', '.join(local_task_names())}; "
                            "lm-eval's own tasks: `lm-eval ls tasks`")
        _load_task(manager, name)


def _load_task(manager, name: str) -> None:
    try:
        manager.load([name])
    except ModelFactoryError:
        raise
    except Exception as exc:  # lm-eval / datasets raise many kinds here (connection, offline, missing config)
        local = name in set(_task_manager(include_defaults=False).all_tasks)
        advice = ("check the files its config in modelfactory/benchmark/lm_eval_tasks/ reads under "
                  "MODELFACTORY_DATA_DIR" if local else
                  "its data comes from the Hugging Face Hub: run where the Hub is reachable (or with the datasets "
                  "cache filled, HF_DATASETS_OFFLINE=1), or use a local task such as piqa_local")
        raise BenchmarkError(f"the data of lm-eval task {name!r} cannot be loaded ({type(exc).__name__}: {exc}); "
                             f"{advice}") from exc


def _number(value) -> float | None:
    """lm-eval's metric value, or None for its ``"N/A"`` (stderr not computed) and NaN."""
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return None


def scores_from_results(results: dict) -> tuple[TaskScore, ...]:
    """The acc / acc_norm rows of ``simple_evaluate``'s output (default ``none`` filter)."""
    n_samples = results.get("n-samples", {})
    scores = []
    for task, metrics in results["results"].items():
        counts = n_samples.get(task, {})
        scores.append(TaskScore(
            task=task,
            acc=_number(metrics.get("acc,none")), acc_stderr=_number(metrics.get("acc_stderr,none")),
            acc_norm=_number(metrics.get("acc_norm,none")),
            acc_norm_stderr=_number(metrics.get("acc_norm_stderr,none")),
            n_docs=counts.get("effective"), n_docs_total=counts.get("original"),
        ))
    return tuple(scores)


def evaluate_tasks(*, model, tokenizer=None, tasks: Sequence[str], limit: int | None = None,
                   batch_size: int = 8, device: str | None = None) -> TaskEvalResult:
    """Zero-shot lm-eval scores of ``model`` on ``tasks``.

    ``model``: a loaded ``transformers.PreTrainedModel`` (evaluated where it is, as it is: pass the
    benchmark's fp16 or GPTQ model) or a model folder / Hub id (lm-eval loads it, ``dtype="auto"``, on
    ``device``, default CUDA when present). ``tokenizer``: a loaded tokenizer or its folder (default:
    the model's). ``limit``: evaluate only the first ``limit`` documents of each task (a bounded subset).
    Call :func:`check_tasks_available` first, before loading the model.
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise SpecError(f"limit must be >= 1 (or None for every document), got {limit}")
    start = time.perf_counter()
    if isinstance(model, (str, Path)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = HFLM(pretrained=str(model), tokenizer=str(tokenizer) if isinstance(tokenizer, Path) else tokenizer,
                  device=device, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=_manager_for(tasks),
                                      log_samples=False)
    if results is None:  # only non-zero ranks of a distributed run get None; we never run one
        raise BenchmarkError("lm-eval returned no results (a non-zero rank of a distributed run?)")
    return TaskEvalResult(lm_eval_version=importlib.metadata.version("lm_eval"), limit=limit, scores=scores_from_results(results),
                          duration_s=time.perf_counter() - start)
