"""Versions of the libraries that shape a run's output (recorded with every run)."""

from __future__ import annotations

import platform
import socket
from importlib import metadata

LIBRARIES = ("modelfactory", "torch", "transformers", "gptqmodel", "peft", "optimum", "accelerate",
             "safetensors", "huggingface_hub", "prefect", "sqlalchemy")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict[str, str | None]:
    info: dict[str, str | None] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                                   "python": platform.python_version(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover
        pass
    return info
