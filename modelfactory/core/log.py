"""Logging that lands in Prefect's run logs when there is a run, and on stderr otherwise.

Inside an isolated worker process (``MODELFACTORY_WORKER=1``) progress lines are printed with a
``[mf] `` prefix; the parent forwards exactly those lines to its Prefect logger.
"""

from __future__ import annotations

import logging
import os
import sys

WORKER_ENV = "MODELFACTORY_WORKER"
PROGRESS_PREFIX = "[mf] "


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - prefect is a hard dependency
        pass
    logger = logging.getLogger("modelfactory")
    if not logger.handlers:  # outside a flow run: own handler (Prefect's logging config ignores us)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | modelfactory - %(message)s",
                                               "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def progress(message: str) -> None:
    """One progress line: call it at least every few seconds in long steps."""
    if os.environ.get(WORKER_ENV) == "1":
        print(PROGRESS_PREFIX + message, flush=True)
    else:
        get_logger().info(message)
