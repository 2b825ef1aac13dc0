"""What third-party libraries log while a command runs the factory goes to a log file, not the console.

Imported in the command's process, torchao, torch, transformers, GPTQModel and Python's ``warnings``
report things a newcomer reads as errors: a ``.so`` built for another CUDA that fails to load, "no
triton" on a CPU machine, pytree deprecations, "Python GIL is enabled". The console keeps Prefect's and modelfactory's own lines (flow and
task runs, progress); every other logger, and every Python warning, goes to
``<home>/logs/run-<run id>.log`` (``sweep-<sweep id>.log`` for a sweep). Step processes already write
all of their output to the step's own log file (``core/isolation.py``).

Python's ``logging`` has no switch for "these loggers on the console, the rest in a file", and torch
and transformers attach their own stderr handlers instead of using the root logger's, hence the few
lines here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Loggers whose records stay on the console: the factory's own and Prefect's (flow and task runs).
CONSOLE_LOGGERS = ("modelfactory", "prefect")
FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


def _own(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in CONSOLE_LOGGERS


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout))


def _to_root_logger() -> None:
    """Loggers other than the console ones that print to the console themselves (torch's, uvicorn's, ...)
    send their records to the root logger instead."""
    for logger_name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or logger_name.split(".")[0] in CONSOLE_LOGGERS:
            continue
        consoles = [h for h in logger.handlers if _is_console(h)]
        for handler in consoles:
            logger.removeHandler(handler)
        if consoles:
            logger.propagate = True


@contextmanager
def library_logs(name: str, *, home: Path | None = None) -> Iterator[Path]:
    """From here on, library log records and Python warnings go to ``<home>/logs/<name>.log`` (default
    home: the settings'), not to the console; yields the file's path, and names it on stderr at the end
    when something was written there. The routing stays for the rest of the process (a command's)."""
    import torch  # noqa: F401 - sets up its loggers' stderr handlers, which are redirected below
    import transformers.utils.logging as transformers_logging
    from prefect.logging.configuration import ensure_logging_setup

    from modelfactory.core.settings import get_settings
    from modelfactory.interfaces.cli.common import err_console

    folder = (home or get_settings().home) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.INFO)
    file_handler.addFilter(lambda record: not _own(record))  # those are on the console (and in Prefect)

    ensure_logging_setup()  # Prefect's console handler on the root logger (once per process)
    root = logging.getLogger()
    for handler in root.handlers:
        if _is_console(handler):
            handler.addFilter(_own)
    root.addHandler(file_handler)
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger -> the root logger
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()  # "Loading weights": the steps log their own progress
    _to_root_logger()
    # GPTQModel prints a banner and warnings ("Python GIL is enabled") to stdout when imported, through
    # its own renderer rather than logging; the factory imports it in this process (the architecture
    # check), so it is imported here, into the log.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        import gptqmodel  # noqa: F401
    if printed.getvalue().strip():
        logging.getLogger("gptqmodel").warning(printed.getvalue().rstrip())
    _to_root_logger()
    try:
        yield path
    finally:
        if path.stat().st_size:
            err_console.print(f"[dim]library warnings and logs of this command: {path}[/dim]", soft_wrap=True)
