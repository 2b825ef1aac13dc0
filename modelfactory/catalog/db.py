"""The run catalog: one SQL database (SQLite or PostgreSQL) recording every factory run.

Open it with :func:`open_catalog`. :class:`Catalog` is put together from one part per concern:

- :mod:`~modelfactory.catalog.connections`  one short connection / transaction per call, errors → CatalogError
- :mod:`~modelfactory.catalog.schema`       the Alembic revision: read, upgrade, make sure it is at head
- :mod:`~modelfactory.catalog.runs`         recording a run step by step, reading one back
- :mod:`~modelfactory.catalog.sweeps`       sweeps: groups of runs, one per configuration, and the winner
- :mod:`~modelfactory.catalog.watches`      the watch list and webhook deliveries

The queries people use (ls filters, compare, best, lineage, leaderboard) are functions over a
catalog's connections in :mod:`~modelfactory.catalog.queries` (which never imports this module).
"""

from __future__ import annotations

from modelfactory.catalog.engine import create_engine, parse_url
from modelfactory.catalog.runs import CatalogRuns
from modelfactory.catalog.schema import CatalogSchema
from modelfactory.catalog.sweeps import CatalogSweeps
from modelfactory.catalog.watches import CatalogWatches


class Catalog(CatalogSchema, CatalogRuns, CatalogSweeps, CatalogWatches):
    """Reads and writes of the run catalog (thread-safe: one short session per call)."""


def open_catalog(url: str | None = None, *, auto_upgrade: bool = False) -> Catalog:
    """Connect to the catalog at *url* (default: ``MODELFACTORY_CATALOG_URL`` / settings).

    An empty database (a new SQLite file, an empty PostgreSQL schema) gets the current schema.
    An existing catalog behind the code's Alembic head is upgraded only when *auto_upgrade*
    (what ``modelfactory catalog upgrade`` does); otherwise :class:`CatalogError` tells the
    user to run that command, so no program silently migrates a shared database.
    """
    if url is None:
        from modelfactory.core.settings import get_settings

        url = get_settings().resolved_catalog_url
    catalog = Catalog(create_engine(parse_url(url)))
    try:
        catalog.ensure_schema(auto_upgrade=auto_upgrade)
    except BaseException:
        catalog.dispose()
        raise
    return catalog
