"""Run a step function in a fresh Python process.

Why: the GPU steps (quantize, benchmark) must measure memory from a clean process, must not
leak a model's memory into the flow process, and may set process-wide state (GPTQModel's
``./logs`` dir, env vars, ``CUDA_VISIBLE_DEVICES``). The child runs
``python -m modelfactory.core.isolated_child MODULE:FUNC IN.json OUT.json``; keyword arguments go in as
JSON, the return value (a pydantic record or plain data) comes back as JSON, and a
:class:`~modelfactory.core.errors.ModelFactoryError` raised in the child is raised again here as
the same class. Everything the child prints goes to *log_path*; its ``[mf] `` progress lines
also go to the Prefect logger.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelfactory.core.errors import ERRORS_BY_NAME, ModelFactoryError, WorkerError
from modelfactory.core.log import PROGRESS_PREFIX, WORKER_ENV, get_logger


def run_isolated(
    target: Callable[..., Any],
    *,
    kwargs: dict[str, Any],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    unexpected: type[ModelFactoryError] = WorkerError,
    library_progress: tuple[re.Pattern[str], str] | None = None,
) -> Any:
    """Call *target* (a module-level function: the child imports it by its module and name) with
    *kwargs* in a child process.

    *library_progress* ``(pattern, template)``: output lines of the child's libraries matching
    *pattern* are logged as ``template.format(*groups)``, at most every 10 s.
    """
    name = target_name(target)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger = get_logger()
    child_env = {**os.environ, **(env or {}), WORKER_ENV: "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="mf-worker-") as tmp:
        in_path, out_path = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_path.write_text(json.dumps(kwargs))
        tail: deque[str] = deque(maxlen=15)
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfactory.core.isolated_child", name, str(in_path), str(out_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=str(cwd) if cwd else None,
            text=True,
            errors="replace",
        )
        with open(log_path, "a", encoding="utf-8") as log, proc:
            assert proc.stdout is not None
            last_library_log = 0.0
            try:
                for line in proc.stdout:
                    log.write(line)
                    line = line.rstrip().split("\r")[-1]
                    marker = line.find(PROGRESS_PREFIX)  # libraries print bars without newlines
                    if marker >= 0:
                        logger.info(line[marker + len(PROGRESS_PREFIX) :])
                        continue
                    if line:
                        tail.append(line[-300:])
                    if library_progress and time.monotonic() - last_library_log > 10:
                        match = library_progress[0].search(line)
                        if match:
                            logger.info(library_progress[1].format(*match.groups()))
                            last_library_log = time.monotonic()
            except BaseException:
                proc.kill()
                raise
            returncode = proc.wait()
        return _result(out_path, target=name, returncode=returncode, tail=tail, log_path=log_path,
                       unexpected=unexpected)


def target_name(target: Callable[..., Any]) -> str:
    """``module:function`` of *target*, which the child imports; a function it cannot import (a nested
    one, a lambda, one defined in ``__main__``) is refused here rather than in the child."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or module == "__main__" or not qualname or "." in qualname or "<" in qualname:
        raise TypeError(f"run_isolated needs a module-level function the child can import, got {target!r}")
    return f"{module}:{qualname}"


def _result(out_path: Path, *, target: str, returncode: int, tail: deque[str], log_path: Path,
            unexpected: type[ModelFactoryError]) -> Any:
    if not out_path.is_file():
        last = "\n    ".join(tail) or "(no output)"
        raise WorkerError(
            f"worker for {target} exited with code {returncode} without a result "
            f"(killed, out of memory, or crashed). Last output:\n    {last}\nFull log: {log_path}"
        )
    outcome = json.loads(out_path.read_text())
    if "ok" in outcome:
        return outcome["ok"]
    error = outcome["error"]
    cls = ERRORS_BY_NAME.get(error["type"])
    if cls is not None:
        raise cls(error["message"])
    raise unexpected(f"{error['type']}: {error['message']} (full log: {log_path})")
