"""``POST /hooks/huggingface``: a new commit of a watched Hub repo starts the ``on-finetune`` deployment.

Checks, in order (each answer is small JSON without stack traces, and never echoes the secret):

==== ==========================================================================================
503  no ``MODELFACTORY_WEBHOOK_SECRET`` configured: every delivery is refused (never unauthenticated)
401  ``X-Webhook-Secret`` missing or wrong (``hmac.compare_digest``)
413  body over 64 KiB (``Content-Length`` or counted while reading)
400  body is not JSON; 422: JSON, but not a Hub webhook payload (which fields are wrong)
200  ``{"status": "ignored", "reason": ...}``: not a model-repo content update, repo not watched,
     or the watched branch did not move
200  ``{"status": "duplicate", "flow_run_id": ...}``: this (repo, commit) was already claimed
202  ``{"status": "accepted", "flow_run_id": ...}``: the build's flow run was created
503  the flow run could not be created (Prefect down): the claim is marked failed, a retry works
==== ==========================================================================================

The Hub sends no delivery id, so a delivery is identified by what it asks for: (repo, commit).
Deduplication is the catalog's ``claim_delivery`` (unique (repo, sha), atomic across processes and
restarts) plus Prefect's idempotency key on the flow run (``modelfactory.triggers.watch.start_build``).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from modelfactory.core.errors import ModelFactoryError, TriggerError
from modelfactory.core.log import get_logger
from modelfactory.core.settings import get_settings
from modelfactory.triggers.webhook_payload import (
    HubWebhookPayload,
    is_malformed_json,
    validation_summary,
)

router = APIRouter(tags=["hooks"])

#: Largest body accepted; Hub payloads are a few KiB.
MAX_BODY_BYTES = 64 * 1024
SECRET_HEADER = "X-Webhook-Secret"


class _TooLarge(Exception):
    pass


def _answer(code: int, status: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"status": status, **fields}, status_code=code)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _secret_matches(given: str | None, expected: str) -> bool:
    return hmac.compare_digest((given or "").encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def _handle(payload: HubWebhookPayload) -> JSONResponse:
    """Blocking part (catalog, Prefect API): runs in the thread pool."""
    from modelfactory.catalog import open_catalog
    from modelfactory.triggers.watch import start_build

    repo = payload.repo.name
    if not payload.is_content_update():
        return _answer(200, "ignored", reason=f"event {payload.event.scope}/{payload.event.action} is not a "
                                              "content update (repo.content/update)")
    if payload.repo.type != "model":
        return _answer(200, "ignored", reason=f"{payload.repo.type} repos are not built, only model repos")
    with open_catalog() as catalog:
        watch = catalog.get_watch(repo)
        if watch is None:
            return _answer(200, "ignored", reason="repo is not on the watch list (modelfactory watch add)")
        sha = payload.new_commit(watch.revision)
        if sha is None:
            return _answer(200, "ignored", reason=f"branch {watch.revision!r} did not move to a new commit")
        started = start_build(repo=repo, sha=sha, event="webhook", catalog=catalog)
    if started.status == "duplicate":
        return _answer(200, "duplicate", repo=repo, sha=sha, flow_run_id=started.flow_run_id)
    return _answer(202, "accepted", repo=repo, sha=sha, flow_run_id=started.flow_run_id)


@router.post("/hooks/huggingface", status_code=202,
             summary="Hugging Face Hub webhook: a new commit of a watched repo starts its build")
async def huggingface(request: Request) -> JSONResponse:
    logger = get_logger()
    secret = get_settings().webhook_secret
    if secret is None or not secret.get_secret_value():
        logger.error("webhook delivery refused: MODELFACTORY_WEBHOOK_SECRET is not set on this server")
        return _answer(503, "error", detail="the webhook is not configured on this server")
    if not _secret_matches(request.headers.get(SECRET_HEADER), secret.get_secret_value()):
        logger.warning(f"webhook delivery from {request.client.host if request.client else '?'}: wrong or "
                       f"missing {SECRET_HEADER}")
        return _answer(401, "error", detail=f"wrong or missing {SECRET_HEADER}")
    try:
        body = await _read_body(request, MAX_BODY_BYTES)
    except _TooLarge:
        return _answer(413, "error", detail=f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        payload = HubWebhookPayload.model_validate_json(body)
    except ValidationError as exc:
        if is_malformed_json(exc):
            return _answer(400, "error", detail="body is not valid JSON")
        return _answer(422, "error", detail="not a Hugging Face webhook payload", errors=validation_summary(exc))
    try:
        return await run_in_threadpool(_handle, payload)
    except TriggerError as exc:
        logger.error(f"webhook delivery for {payload.repo.name}: {exc.message}")
        return _answer(503, "error", detail="could not start the build now; retry the delivery later")
    except ModelFactoryError as exc:
        logger.error(f"webhook delivery for {payload.repo.name} failed ({exc.kind}): {exc.message}")
        return _answer(500, "error", detail=f"internal error ({exc.kind}); see the server log")
    except Exception as exc:  # noqa: BLE001 - never a stack trace in the answer
        logger.exception(f"webhook delivery for {payload.repo.name} failed: {type(exc).__name__}")
        return _answer(500, "error", detail="internal error; see the server log")
