"""Triggers: what starts a factory run besides a person — the Hub webhook and the nightly check.

- :mod:`~modelfactory.triggers.watch`   a watch → the spec of a build of commit SHA (a run or a sweep);
- :mod:`~modelfactory.triggers.build`   start that build exactly once, on the Prefect server;
- :mod:`~modelfactory.triggers.webhook` the webhook's secret, setup check and decision per delivery
  (payload model: :mod:`~modelfactory.triggers.webhook_payload`);
- :mod:`~modelfactory.triggers.nightly` the nightly check per watch.

The HTTP route (``interfaces/server/hooks.py``), the CLI (``interfaces/cli/watch.py``) and the flows
(``flows/nightly.py``, ``flows/on_finetune.py``) only adapt these. ``docs/triggers.md`` has the why.
"""

from modelfactory.triggers.build import (
    BuildStart,
    BuildStatus,
    require_prefect_server,
    start_build,
)
from modelfactory.triggers.nightly import (
    WatchAction,
    WatchCheck,
    check_watch,
    finish_nightly,
)
from modelfactory.triggers.watch import (
    COMMIT_SHA,
    WATCH_KINDS,
    Build,
    TriggerEvent,
    WatchKind,
    describe_build,
    is_sweep,
    normalize_repo,
    spec_for_commit,
    spec_for_watched_commit,
    validate_watch,
    watch_builds,
)
from modelfactory.triggers.webhook import (
    DeliveryOutcome,
    WebhookDecision,
    check_webhook_setup,
    handle_delivery,
    secret_matches,
    webhook_secret,
)
from modelfactory.triggers.webhook_payload import HubWebhookPayload

__all__ = [
    "COMMIT_SHA", "WATCH_KINDS", "Build", "BuildStart", "BuildStatus", "DeliveryOutcome", "HubWebhookPayload",
    "TriggerEvent", "WatchAction", "WatchCheck", "WatchKind", "WebhookDecision", "check_watch", "check_webhook_setup",
    "describe_build", "finish_nightly", "handle_delivery", "is_sweep", "normalize_repo", "require_prefect_server",
    "secret_matches", "spec_for_commit", "spec_for_watched_commit", "start_build", "validate_watch",
    "watch_builds", "webhook_secret",
]
