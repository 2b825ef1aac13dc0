"""Hugging Face Hub webhook payloads (https://huggingface.co/docs/hub/webhooks) and what they mean here.

Only the fields the factory reads are modelled; unknown fields are ignored (the Hub adds fields
over time: a payload is an external message, not one of our specs). A new commit on a branch is
``event.scope == "repo.content"`` (``action`` always ``update``) with ``updatedRefs`` listing
``{ref, oldSha, newSha}`` per moved reference; ``repo.headSha`` is the head of ``main``. Pull
requests also move a ``refs/pr/N`` reference, tags a ``refs/tags/...`` one: only the watched
branch (``refs/heads/<revision>``) counts. A deleted branch has ``newSha: null``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfactory.core.ids import COMMIT_SHA

Sha = Annotated[str, Field(pattern=COMMIT_SHA.pattern)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class HubEvent(_Payload):
    action: str = Field(max_length=64)
    scope: str = Field(max_length=128)


class HubRepo(_Payload):
    type: str = Field(max_length=32, description="model, dataset or space")
    name: str = Field(min_length=3, max_length=200, description="owner/name")
    head_sha: Sha | None = Field(default=None, alias="headSha", description="head of the main branch")


class UpdatedRef(_Payload):
    ref: str = Field(max_length=300)
    old_sha: Sha | None = Field(default=None, alias="oldSha")
    new_sha: Sha | None = Field(default=None, alias="newSha")


class HubWebhookPayload(_Payload):
    event: HubEvent
    repo: HubRepo
    updated_refs: list[UpdatedRef] = Field(default_factory=list, alias="updatedRefs", max_length=1000)

    def is_content_update(self) -> bool:
        return self.event.scope == "repo.content" and self.event.action == "update"

    def new_commit(self, *, branch: str) -> str | None:
        """The commit *branch* moved to in this event, if it moved (and was not deleted)."""
        ref = f"refs/heads/{branch}"
        for updated in self.updated_refs:
            if updated.ref == ref:
                return updated.new_sha
        if not self.updated_refs and branch == "main":  # older payloads: no updatedRefs, headSha only
            return self.repo.head_sha
        return None


def validation_summary(*, exc: ValidationError) -> list[str]:
    """``field: message`` per problem, without echoing the offending values back."""
    return [f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}" for err in exc.errors()][:10]


def is_malformed_json(*, exc: ValidationError) -> bool:
    return any(err["type"] == "json_invalid" for err in exc.errors())
