"""Entry point of an isolated step process: ``python -m modelfactory.core.isolated_child MOD:FUNC IN OUT``."""

from __future__ import annotations

import importlib
import json
import sys
import traceback

from pydantic import BaseModel

from modelfactory.core.errors import ModelFactoryError


def _set_parent_death_signal() -> None:
    """Die with the parent (a killed flow process must not leave a quantization running)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def main(argv: list[str]) -> int:
    target, in_path, out_path = argv
    _set_parent_death_signal()
    module_name, func_name = target.split(":")
    kwargs = json.loads(open(in_path).read())
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(**kwargs)
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        outcome = {"ok": result}
        code = 0
    except ModelFactoryError as exc:
        traceback.print_exc()
        outcome = {"error": {"type": type(exc).__name__, "message": exc.message}}
        code = 1
    except Exception as exc:  # reported to the parent, which wraps it in the step's error class
        traceback.print_exc()
        outcome = {"error": {"type": type(exc).__name__, "message": str(exc)[:2000]}}
        code = 1
    with open(out_path, "w") as fh:
        json.dump(outcome, fh)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
