"""The run catalog: every factory run, its steps, metrics, gate verdict and artifacts, in SQL.

>>> catalog = open_catalog()            # MODELFACTORY_CATALOG_URL, default SQLite under ~/.modelfactory
>>> catalog.list_runs(status="passed")  # newest first
"""

from modelfactory.catalog.db import Catalog, head_revision, mask_url, open_catalog
from modelfactory.catalog.records import (
    FINAL_RUN_STATUSES,
    METRIC_SIDES,
    RUN_STATUSES,
    STEP_STATUSES,
    ArtifactRecord,
    DeliveryRecord,
    GateCheckRecord,
    MetricRecord,
    PublicationRecord,
    RunDetail,
    RunSummary,
    StepRecord,
    WatchRecord,
)

__all__ = [
    "FINAL_RUN_STATUSES",
    "METRIC_SIDES",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "ArtifactRecord",
    "DeliveryRecord",
    "PublicationRecord",
    "WatchRecord",
    "Catalog",
    "GateCheckRecord",
    "MetricRecord",
    "RunDetail",
    "RunSummary",
    "StepRecord",
    "head_revision",
    "mask_url",
    "open_catalog",
]
