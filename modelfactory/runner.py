"""Start a factory run from raw spec data (CLI, demo), recording invalid specs as failed runs."""

from __future__ import annotations

import uuid
from typing import Any

from modelfactory.catalog import open_catalog
from modelfactory.errors import SpecError
from modelfactory.records import RunOutcome
from modelfactory.specs import FactorySpec, parse_spec


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge *overrides* (e.g. CLI flags, ``None`` = not given) into *base*."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        elif isinstance(value, dict):
            merged[key] = merge_overrides({}, value)
        else:
            merged[key] = value
    return merged


def record_invalid_spec(data: dict[str, Any], error: SpecError) -> str:
    """A spec that never validated still gets a ``failed`` run row with the reason."""
    run_id = str(uuid.uuid4())
    name = data.get("name") if isinstance(data.get("name"), str) else "invalid-spec"
    catalog = open_catalog()
    catalog.start_run(run_id=run_id, name=name, spec=data, run_key="invalid-spec")
    catalog.finish_run(run_id=run_id, status="failed", error=error.message, error_kind=error.kind)
    return run_id


def run_factory(data: dict[str, Any] | FactorySpec, *, origin: str = "spec", run_id: str | None = None) -> RunOutcome:
    """Validate *data* and run the factory flow on it (ephemeral Prefect unless PREFECT_API_URL is set).

    Errors propagate; the run row in the catalog (id *run_id*, generated if not given) says why.
    """
    from flows.factory import factory

    if isinstance(data, FactorySpec):
        spec = data
    else:
        try:
            spec = parse_spec(data, origin=origin)
        except SpecError as exc:
            record_invalid_spec(data, exc)
            raise
    return factory(spec, run_id=run_id or str(uuid.uuid4()))
