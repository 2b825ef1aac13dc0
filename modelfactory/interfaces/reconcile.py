"""Close the catalog's runs and sweeps whose process died, asking the Prefect server about their flow runs.

Used by ``modelfactory catalog reconcile`` and once when ``modelfactory serve`` starts. The rule is
:func:`modelfactory.catalog.recovery.reconcile`'s; this module only supplies the Prefect side: the
state of a flow run on the configured server (``PREFECT_API_URL``), ``None`` when the server has no
such run. With no server configured, the catalog's liveness leases alone decide (an ephemeral API
started here would know no flow run).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from modelfactory.catalog import Catalog
from modelfactory.catalog.recovery import Reconciled, reconcile


def flow_run_states() -> Callable[[str], str | None] | None:
    """The state type of a flow run id on the configured Prefect server; ``None`` when none is configured."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    def state(flow_run_id: str) -> str | None:
        try:
            ident = uuid.UUID(flow_run_id)
        except ValueError:
            return None
        with get_client(sync_client=True) as client:
            try:
                flow_run = client.read_flow_run(ident)
            except ObjectNotFound:
                return None
        return flow_run.state.type.value if flow_run.state else None

    return state


def reconcile_catalog(catalog: Catalog) -> list[Reconciled]:
    """:func:`~modelfactory.catalog.recovery.reconcile` with the Prefect server's view of the flow runs."""
    return reconcile(catalog, flow_run_state=flow_run_states())
