"""Checks that a folder is a loadable causal-LM checkpoint, before any heavy work."""

from __future__ import annotations

import json
from pathlib import Path

from modelfactory.core.errors import SourceError


def check_model_dir(path: Path, *, trust_remote_code: bool) -> dict:
    """Fail early, with a clear message, on folders that are not loadable causal-LM checkpoints."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{str(path)!r} has no config.json: point at a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            f"model at {str(path)!r} ships its own Python code (auto_map in config.json); "
            "set trust_remote_code: true in the spec only if you trust its author"
        )
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")]
        detail = f" (found pickled {pickled[:3]}; convert them to safetensors)" if pickled else ""
        raise SourceError(f"{str(path)!r} has no .safetensors weights{detail}")
    return config
