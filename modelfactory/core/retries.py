"""Small glue between the factory and Prefect."""

from __future__ import annotations

from typing import Any

from modelfactory.core.errors import is_transient


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for tasks: retry only :class:`~modelfactory.core.errors.TransientError`."""
    try:
        state.result()
    except BaseException as exc:  # the state's exception is re-raised by result()
        return is_transient(exc)
    return False
