"""Local copies of evaluation task data (for the lm-eval task configs in ``lm_eval_tasks/``).

Each reader finds its files under the ``data_dir`` setting (``MODELFACTORY_DATA_DIR``) and raises a
:class:`~modelfactory.core.errors.BenchmarkError` naming the missing file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelfactory.core.errors import BenchmarkError
from modelfactory.core.settings import get_settings

#: PIQA's validation split as published by its authors (https://yonatanbisk.com/piqa/, AFL-3.0):
#: one JSON object per line (goal, sol1, sol2) and the labels (0/1) one per line, in the same order.
PIQA_FILES = ("piqa/valid.jsonl", "piqa/valid-labels.lst")


def _data_dir(data_dir: Path | None) -> Path:
    folder = data_dir or get_settings().data_dir
    if folder is None:
        raise BenchmarkError("MODELFACTORY_DATA_DIR is not set, so local task data cannot be found: point it at "
                             "the folder holding e.g. piqa/valid.jsonl (the shared data folder, ../shared/data)")
    return Path(folder)


def data_files(files: tuple[str, ...], *, data_dir: Path | None = None) -> list[Path]:
    """The local files of a task, checked to exist (clear error naming the first missing one)."""
    folder = _data_dir(data_dir)
    paths = [folder / name for name in files]
    for path in paths:
        if not path.is_file():
            raise BenchmarkError(f"local task data {path} is missing: put {', '.join(files)} under "
                                 f"{folder} (MODELFACTORY_DATA_DIR), or choose another task")
    return paths


def piqa_rows(*, data_dir: Path | None = None) -> list[dict]:
    """PIQA validation items with their ``label`` joined in (1,838 rows)."""
    questions, labels = data_files(PIQA_FILES, data_dir=data_dir)
    rows = [json.loads(line) for line in questions.read_text().splitlines() if line.strip()]
    answers = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    if len(rows) != len(answers) or any(a not in ("0", "1") for a in answers):
        raise BenchmarkError(f"{questions} ({len(rows)} items) and {labels} ({len(answers)} labels, 0 or 1 each) "
                             "do not match: restore both files from the same PIQA release")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(a)}
            for r, a in zip(rows, answers, strict=True)]


def piqa_validation(*, data_dir: Path | None = None):
    """``DatasetDict`` with the ``validation`` split, as lm-eval's ``piqa`` task sees it from the Hub."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(piqa_rows(data_dir=data_dir))})
