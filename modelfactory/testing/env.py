"""Where the checkout and its shared data are, free ports, and temporary settings."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The checkout (tests and benchmarks run from one; the package is installed editable).
REPO = Path(__file__).resolve().parents[2]
#: ``../shared/data`` beside the checkout (WikiText-2, PIQA), unless MODELFACTORY_DATA_DIR says otherwise.
SHARED_DATA = Path(os.environ.get("MODELFACTORY_DATA_DIR", REPO.parent / "shared" / "data"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def settings_env(**values: str | None) -> Iterator[None]:
    """Set (``None``: unset) environment variables for this process and its children, with the
    factory's settings cache cleared on the way in and out; the old values come back afterwards."""
    from modelfactory.core.settings import environment

    with environment(values):
        yield


@contextmanager
def own_work_dir(path: Path) -> Iterator[Path]:
    """Point MODELFACTORY_WORK_DIR at *path* (for steps that must not reuse other outputs)."""
    with settings_env(MODELFACTORY_WORK_DIR=str(path)):
        yield path
