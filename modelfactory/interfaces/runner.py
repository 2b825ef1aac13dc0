"""Start a factory run from raw spec data (CLI, demo), recording invalid specs as failed runs."""

from __future__ import annotations

import uuid
from typing import Any

from modelfactory.catalog import open_catalog
from modelfactory.core.errors import SpecError
from modelfactory.core.records import RunOutcome
from modelfactory.core.specs import FactorySpec, parse_spec
from modelfactory.core.sweep_spec import SweepSpec, parse_sweep_spec
from modelfactory.sweeps.outcome import SweepOutcome


def record_invalid_spec(*, data: dict[str, Any], error: SpecError) -> str:
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
    from modelfactory.flows.factory import factory

    if isinstance(data, FactorySpec):
        spec = data
    else:
        try:
            spec = parse_spec(data, origin=origin)
        except SpecError as exc:
            record_invalid_spec(data=data, error=exc)
            raise
    return factory(spec, run_id=run_id or str(uuid.uuid4()))


def run_sweep(data: dict[str, Any] | SweepSpec, *, origin: str = "sweep spec", sweep_id: str | None = None,
              ) -> SweepOutcome:
    """Validate *data* and run the sweep flow on it (ephemeral Prefect unless PREFECT_API_URL is set).

    Errors propagate; the sweep row in the catalog (id *sweep_id*, generated if not given) says why
    once the sweep started. An invalid spec raises :class:`SpecError` before anything is recorded.
    """
    from modelfactory.flows.sweep import sweep

    spec = data if isinstance(data, SweepSpec) else parse_sweep_spec(data, origin=origin)
    return sweep(spec, sweep_id=sweep_id or str(uuid.uuid4()))
