"""The nightly check: for each watch, where its branch is now, and a build for a new commit.

For each watch: resolve the watched branch to its commit now, compare it with the watch's
``last_sha``, and for a new one start the build (:func:`modelfactory.triggers.build.start_build`:
claimed once per commit, so a commit the webhook already started is not built twice). Nothing
changed: nothing runs. A watch whose repo cannot be resolved does not stop the others; the check
fails at the end, naming it (:func:`finish_nightly`). ``dry_run`` only reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from modelfactory.core.errors import ModelFactoryError, TriggerError
from modelfactory.core.log import get_logger
from modelfactory.triggers.build import start_build

if TYPE_CHECKING:
    from modelfactory.catalog.db import Catalog
    from modelfactory.catalog.records import WatchRecord

#: ``unchanged``: branch still at ``last_sha``; ``started`` / ``duplicate``: see ``start_build``;
#: ``would-start``: a new commit, not started (``dry_run``); ``error``: the watch could not be checked.
WatchAction = Literal["unchanged", "started", "duplicate", "would-start", "error"]


class WatchCheck(BaseModel):
    """What the nightly check found and did for one watched repo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    revision: str
    last_sha: str | None
    head_sha: str | None
    action: WatchAction
    flow_run_id: str | None = None
    error: str | None = None


def check_watch(*, watch: WatchRecord, resolve_head: Callable[[str, str], str], dry_run: bool,
                catalog: Catalog) -> WatchCheck:
    """Check one watch: *resolve_head(repo, branch)* gives its commit now (the nightly flow passes its
    retried ``resolve-head`` task). Errors of the factory become an ``error`` check, not an exception."""
    logger = get_logger()
    seen = {"repo": watch.repo, "revision": watch.revision, "last_sha": watch.last_sha}
    try:
        head = resolve_head(watch.repo, watch.revision)
        if head == watch.last_sha:
            check = WatchCheck(**seen, head_sha=head, action="unchanged")
        elif dry_run:
            check = WatchCheck(**seen, head_sha=head, action="would-start")
        else:
            started = start_build(repo=watch.repo, sha=head, event="nightly", catalog=catalog)
            check = WatchCheck(**seen, head_sha=head, action=started.status, flow_run_id=started.flow_run_id)
    except ModelFactoryError as exc:
        logger.error(f"nightly: {watch.repo}@{watch.revision}: {exc.message}")
        return WatchCheck(**seen, head_sha=None, action="error", error=exc.message)
    logger.info(f"nightly: {watch.repo}@{watch.revision}: {check.action} "
                f"({(watch.last_sha or 'never built')[:12]} -> {head[:12]})"
                + (f", flow run {check.flow_run_id}" if check.flow_run_id else ""))
    return check


def finish_nightly(*, checks: list[WatchCheck]) -> list[WatchCheck]:
    """Log the summary; :class:`TriggerError` naming every watch that could not be checked (the others ran)."""
    failed = [c for c in checks if c.action == "error"]
    get_logger().info(f"nightly: {len(checks)} watched repo(s), {sum(c.action == 'started' for c in checks)} "
                      f"build(s) started, {len(failed)} error(s)")
    if failed:
        raise TriggerError("nightly check could not check " + "; ".join(f"{c.repo}: {c.error}" for c in failed)
                           + ": fix these watches (modelfactory watch ls) or the Hub connection; the others ran")
    return checks
