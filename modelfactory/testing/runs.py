"""One real factory run of the tiny model, made once and shared: the steps' outputs land in the
session's work dir, so every later run of the same spec (a rerun, the CLI's ``run``) reuses them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfactory.core.records import RunOutcome
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.env import settings_env
from modelfactory.testing.models import TINY_GATE, tiny_spec


def passing_spec(tiny_llama: Path, tiny_lora: Path, **overrides: Any) -> dict[str, Any]:
    """The tiny model merged with one LoRA adapter, quantized, benchmarked and gated so that it passes."""
    return tiny_spec(tiny_llama, **{"adapters": [{"uri": str(tiny_lora)}], "gate": TINY_GATE, **overrides})


@dataclass(frozen=True)
class SharedRun:
    """A finished run: its spec, its outcome, and the catalog that recorded it (its own)."""

    spec: dict[str, Any]
    outcome: RunOutcome
    catalog_url: str


def run_in_catalog(spec: dict[str, Any], *, catalog_url: str) -> SharedRun:
    """Run *spec* recording into the catalog *catalog_url* (not the calling test module's)."""
    with settings_env(MODELFACTORY_CATALOG_URL=catalog_url):
        return SharedRun(spec=spec, outcome=run_factory(spec), catalog_url=catalog_url)
