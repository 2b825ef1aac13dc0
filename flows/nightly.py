"""The ``nightly`` flow: look for new commits of every watched repo and build those that changed.

Wiring only: the check per watch is :func:`modelfactory.triggers.nightly.check_watch` (with the
retried ``resolve-head`` task of ``tasks/watch.py``); the builds it starts are subflows of this run.
Scheduled by ``deployments/prefect.yaml`` (cron); ``dry_run`` only reports.
"""

from __future__ import annotations

from prefect import flow

from modelfactory.catalog import open_catalog
from modelfactory.triggers import WatchCheck, check_watch, finish_nightly
from modelfactory.tasks.watch import resolve_head_task


@flow(name="watch-nightly", log_prints=True, validate_parameters=True)
def nightly(dry_run: bool = False) -> list[WatchCheck]:
    """Start a build for every watched repo whose branch moved since its last build."""
    with open_catalog() as catalog:
        checks = [check_watch(watch=watch, resolve_head=resolve_head_task, dry_run=dry_run, catalog=catalog)
                  for watch in catalog.list_watches()]
    return finish_nightly(checks=checks)
