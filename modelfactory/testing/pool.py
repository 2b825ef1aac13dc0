"""Helpers for tests that run the factory through a real GPU pool (Prefect server + workers)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from modelfactory.gpu_pool import DEFAULT_GPU_DEPLOYMENT
from modelfactory.testing.env import settings_env
from modelfactory.testing.models import tiny_spec
from modelfactory.testing.prefect_server import GpuHostWorkers


@contextmanager
def diagnostics(workers: GpuHostWorkers) -> Iterator[None]:
    """On failure, print the worker and server logs (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        print(workers.worker_logs(120))
        print(workers.server.tail(40))
        raise


def pool_spec(tiny_llama: Path, name: str, **overrides: Any) -> dict:
    """The tiny spec with a gate the random model passes; *overrides* replace top-level fields."""
    fields = {"name": name, "gate": {"max_ppl_increase_pct": 50.0}, "publish": {"name": name}}
    return tiny_spec(tiny_llama, **{**fields, **overrides})


def dispatching_to_gpu_pool(**extra: str | None) -> AbstractContextManager[None]:
    """Settings under which this process's runs send their GPU stage to the ``gpu-stage`` deployment and
    poll it every second (plus *extra* settings; ``None`` unsets one)."""
    return settings_env(MODELFACTORY_GPU_DEPLOYMENT=DEFAULT_GPU_DEPLOYMENT, MODELFACTORY_GPU_POLL_S="1", **extra)


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run *fn* in a thread that sees this thread's Prefect settings (a copied context); the box gets
    its ``"value"`` or ``"error"``."""
    ctx, box = contextvars.copy_context(), {}

    def target() -> None:
        try:
            box["value"] = ctx.run(fn, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def when(stamp: str | None) -> datetime | None:
    """A Prefect API timestamp (``...Z``) as an aware datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
