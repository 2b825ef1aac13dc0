"""The run catalog: every factory run, its steps, metrics, gate verdict and artifacts, in SQL.

>>> catalog = open_catalog()            # MODELFACTORY_CATALOG_URL, default SQLite under ~/.modelfactory
>>> catalog.list_runs(status="passed")  # newest first

Modules: ``db`` (:class:`Catalog`, :func:`open_catalog`) built from ``connections``, ``schema``,
``runs``, ``sweeps`` and ``watches``; ``engine`` (URLs, engine), ``ids`` (run-id prefixes), ``models`` (ORM
tables), ``mappers`` (rows → records), ``records`` (the records and closed sets), ``queries``
(ls / compare / best / lineage / leaderboard), ``metrics``, ``recovery``, ``migrations``; rendering
lives in :mod:`modelfactory.reports` (Markdown) and :mod:`modelfactory.interfaces` (terminal, CSV, HTML).
"""

from modelfactory.catalog.db import Catalog, open_catalog
from modelfactory.catalog.engine import mask_url
from modelfactory.catalog.records import (
    FINAL_RUN_STATUSES,
    METRIC_SIDES,
    RUN_STATUSES,
    STEP_STATUSES,
    SWEEP_STATUSES,
    ArtifactRecord,
    DeliveryRecord,
    GateCheckRecord,
    MetricRecord,
    RunDetail,
    RunSummary,
    StepRecord,
    SweepDetail,
    SweepMemberRow,
    SweepSummary,
    WatchRecord,
)
from modelfactory.catalog.schema import head_revision

__all__ = [
    "FINAL_RUN_STATUSES",
    "METRIC_SIDES",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "SWEEP_STATUSES",
    "ArtifactRecord",
    "DeliveryRecord",
    "WatchRecord",
    "Catalog",
    "GateCheckRecord",
    "MetricRecord",
    "RunDetail",
    "RunSummary",
    "StepRecord",
    "SweepDetail",
    "SweepMemberRow",
    "SweepSummary",
    "head_revision",
    "mask_url",
    "open_catalog",
]
