"""A watch and the spec of its builds: which repo, which kind, what a build of commit SHA runs.

A watch (a catalog ``watches`` row, managed with ``modelfactory watch``) names a Hub repo, the
branch followed (``revision``, default ``main``) and the spec fields of its runs (quantization,
benchmark, gate, publish):

- ``kind="adapter"``: a LoRA adapter repo; a new commit is merged into ``base`` and quantized;
- ``kind="base"``: a base model repo; a new commit is quantized as is.

Starting a build is :mod:`modelfactory.triggers.build`; ``docs/triggers.md`` has the why.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, get_args

from modelfactory.catalog.records import WatchKind
from modelfactory.core.errors import SpecError
from modelfactory.core.ids import COMMIT_SHA, check_commit_sha, check_hub_repo_id  # noqa: F401 (COMMIT_SHA: flows)
from modelfactory.core.log import get_logger
from modelfactory.core.specs import (
    FactorySpec,
    merge_overrides,
    parse_spec,
)

if TYPE_CHECKING:
    from modelfactory.catalog.db import Catalog
    from modelfactory.catalog.records import WatchRecord

# What a watched repo holds (a LoRA adapter built on the watch's base, or a base model): the catalog's set.
WATCH_KINDS: tuple[str, ...] = get_args(WatchKind)
#: What started a build: the Hub webhook, the nightly check, or a person (Prefect UI / API).
TriggerEvent = Literal["webhook", "nightly", "manual"]
#: Spec fields that come from the watch itself, never from its stored spec.
WATCH_OWNED_FIELDS = ("base", "adapters")
#: Commit used to validate a watch's spec before any commit exists.
PLACEHOLDER_SHA = "0" * 40


def normalize_repo(*, repo: str) -> str:
    """``owner/name`` (an ``hf://`` prefix is dropped); :class:`SpecError` for anything else."""
    return check_hub_repo_id(repo.removeprefix("hf://"), what="watched repo", fix="fix the repo id")


def default_run_name(*, repo: str) -> str:
    """Run/artifact label for a watched repo: ``owner--name`` (the spec's ``name`` pattern)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", repo.replace("/", "--"))[:64]


def spec_data_for_commit(*, repo: str, kind: WatchKind, base: str | None, fields: dict[str, Any], sha: str) -> dict:
    """The raw spec of a build of *repo* at *sha*: the watch's *fields* plus the sources it names."""
    owned = [name for name in WATCH_OWNED_FIELDS if name in fields and name != "base"]
    if isinstance(fields.get("base"), dict) and "uri" in fields["base"]:
        owned.append("base.uri")  # base.revision may be set: the revision of the base an adapter uses
    if owned:
        raise SpecError(f"the spec of watch {repo!r} sets {', '.join(owned)}: sources come from the watch itself "
                        "(REPO and --base); drop these fields")
    data = merge_overrides({"name": default_run_name(repo=repo)}, fields)
    if kind == "adapter":
        if not base:
            raise SpecError(f"adapter watch {repo!r} has no base model: add it again with --base BASE")
        data["base"] = merge_overrides(dict(fields.get("base") or {}), {"uri": base})
        data["adapters"] = [{"uri": f"hf://{repo}", "revision": sha}]
    elif kind == "base":
        data["base"] = {"uri": f"hf://{repo}", "revision": sha}
    else:
        raise SpecError(f"watch {repo!r} has kind {kind!r}: use {' or '.join(map(repr, WATCH_KINDS))}")
    return data


def spec_for_commit(*, watch: WatchRecord, sha: str) -> FactorySpec:
    """The :class:`FactorySpec` that builds commit *sha* of a watched repo."""
    data = spec_data_for_commit(repo=watch.repo, kind=watch.kind, base=watch.base, fields=watch.spec,
                                sha=check_commit_sha(sha))
    return parse_spec(data, origin=f"watch {watch.repo}")


def spec_for_watched_commit(*, repo: str, sha: str, event: TriggerEvent, catalog: Catalog | None = None
                            ) -> FactorySpec:
    """What the ``on-finetune`` flow builds: commit *sha* of watched *repo*, with the watch's fields and gate."""
    from modelfactory.catalog import open_catalog

    watch = (catalog or open_catalog()).get_watch(repo)
    if watch is None:
        raise SpecError(f"{repo!r} is not on the watch list: add it with `modelfactory watch add {repo} --base BASE`")
    spec = spec_for_commit(watch=watch, sha=sha)
    get_logger().info(f"on-finetune ({event}): building {repo}@{sha[:12]} as {spec.name!r} "
                      f"({watch.kind} watch; base {spec.base.uri}, {spec.quantize.label()})")
    return spec


def validate_watch(*, repo: str, kind: WatchKind, base: str | None, fields: dict[str, Any]) -> FactorySpec:
    """Check a watch before it is stored: its builds must have a valid spec."""
    data = spec_data_for_commit(repo=repo, kind=kind, base=base, fields=fields, sha=PLACEHOLDER_SHA)
    return parse_spec(data, origin=f"watch {repo}")
