"""``POST /hooks/huggingface``: a new commit of a watched Hub repo starts the ``on-finetune`` deployment.

This route only adapts HTTP to :mod:`modelfactory.triggers.webhook` (secret, decision per delivery).
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
503  the flow run could not be created (Prefect down, or no Prefect server configured): the claim
     is marked failed (or never made), a retry works
==== ==========================================================================================
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from modelfactory.core.errors import ModelFactoryError, TriggerError
from modelfactory.core.log import get_logger
from modelfactory.triggers.webhook import (
    DeliveryOutcome,
    handle_delivery,
    secret_matches,
    webhook_secret,
)
from modelfactory.triggers.webhook_payload import (
    HubWebhookPayload,
    is_malformed_json,
    validation_summary,
)

router = APIRouter(tags=["hooks"])

#: Largest body accepted; Hub payloads are a few KiB.
MAX_BODY_BYTES = 64 * 1024
SECRET_HEADER = "X-Webhook-Secret"
#: HTTP status of each delivery outcome (the build's run created: 202; nothing new to do: 200).
OUTCOME_STATUS: dict[DeliveryOutcome, int] = {"ignored": 200, "duplicate": 200, "accepted": 202}


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


@router.post("/hooks/huggingface", status_code=202,
             summary="Hugging Face Hub webhook: a new commit of a watched repo starts its build")
async def huggingface(request: Request) -> JSONResponse:
    logger = get_logger()
    secret = webhook_secret()
    if secret is None:
        logger.error("webhook delivery refused: MODELFACTORY_WEBHOOK_SECRET is not set on this server")
        return _answer(503, "error", detail="the webhook is not configured on this server")
    if not secret_matches(given=request.headers.get(SECRET_HEADER), expected=secret):
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
        if is_malformed_json(exc=exc):
            return _answer(400, "error", detail="body is not valid JSON")
        return _answer(422, "error", detail="not a Hugging Face webhook payload", errors=validation_summary(exc=exc))
    try:
        decision = await run_in_threadpool(lambda: handle_delivery(payload=payload))  # blocking: catalog, Prefect
    except TriggerError as exc:
        logger.error(f"webhook delivery for {payload.repo.name}: {exc.message}")
        return _answer(503, "error", detail="could not start the build now; retry the delivery later")
    except ModelFactoryError as exc:
        logger.error(f"webhook delivery for {payload.repo.name} failed ({exc.kind}): {exc.message}")
        return _answer(500, "error", detail=f"internal error ({exc.kind}); see the server log")
    except Exception as exc:  # noqa: BLE001 - never a stack trace in the answer
        logger.exception(f"webhook delivery for {payload.repo.name} failed: {type(exc).__name__}")
        return _answer(500, "error", detail="internal error; see the server log")
    return JSONResponse(decision.answer(), status_code=OUTCOME_STATUS[decision.status])
