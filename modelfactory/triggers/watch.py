"""A watch and the spec of its builds: which repo, which kind, what a build of commit SHA runs.

A watch (a catalog ``watches`` row, managed with ``modelfactory watch``) names a Hub repo, the
branch followed (``revision``, default ``main``) and the spec fields of its runs (quantization,
benchmark, gate, publish):

- ``kind="adapter"``: a LoRA adapter repo; a new commit is merged into ``base`` and quantized;
- ``kind="base"``: a base model repo; a new commit is quantized as is.

A build is one factory run (a :class:`FactorySpec`), or a sweep (a :class:`SweepSpec`) when the
fields list configurations (``grid`` or ``configs``): :func:`is_sweep`, :func:`build_spec`.

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
from modelfactory.core.sweep_spec import SweepSpec, parse_sweep_spec

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
#: The fields that make a watch's builds sweeps: the configurations to build.
SWEEP_CONFIG_FIELDS = ("grid", "configs")
#: Fields only a sweep has (``grid``, ``configs``, ``kernels``, ``objective``, ``publish_mode``).
SWEEP_ONLY_FIELDS = tuple(name for name in SweepSpec.model_fields if name not in FactorySpec.model_fields)
#: What a build of a watched commit is.
Build = FactorySpec | SweepSpec


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


def is_sweep(fields: dict[str, Any]) -> bool:
    """Whether a watch's spec *fields* make its builds sweeps: they list configurations (``grid`` or ``configs``).

    The one rule for the flow, the CLI and ``watch ls``. Other sweep-only fields without these are refused
    by :func:`build_spec` (not taken for a sweep of one configuration)."""
    return any(fields.get(name) is not None for name in SWEEP_CONFIG_FIELDS)


def build_spec(*, repo: str, kind: WatchKind, base: str | None, fields: dict[str, Any], sha: str) -> Build:
    """The spec of a build of *repo* at *sha*: a :class:`SweepSpec` when :func:`is_sweep`, else a
    :class:`FactorySpec`; :class:`SpecError` with every problem."""
    data = spec_data_for_commit(repo=repo, kind=kind, base=base, fields=fields, sha=sha)
    origin = f"watch {repo}"
    if is_sweep(fields):
        return parse_sweep_spec(data, origin=origin)
    if stray := [name for name in SWEEP_ONLY_FIELDS if name in fields]:
        raise SpecError(f"the spec of watch {repo!r} sets {', '.join(stray)} but no `grid` or `configs`: "
                        f"{'these are' if len(stray) > 1 else 'this is'} for sweeps only. List the configurations "
                        "to sweep (`grid: {group_size: [128, 64]}` or `configs: [...]`; `configs: [{}]` sweeps the "
                        "quantize settings alone, e.g. over `kernels`), or drop "
                        f"{'them' if len(stray) > 1 else 'it'} for a plain factory run")
    return parse_spec(data, origin=origin)


def describe_build(spec: Build) -> str:
    """One line on what a build is: ``run gptq-4bit-128g`` or ``sweep of 4 configurations (objective speed,
    publish winner)`` (the configurations before ``group_size: auto`` is resolved for the model)."""
    if isinstance(spec, SweepSpec):
        count = len(spec.members())
        return (f"sweep of {count} configuration{'s' if count != 1 else ''} (objective {spec.objective}, "
                f"publish {spec.publish_mode})")
    return f"run {spec.quantize.label()}"


def spec_for_commit(*, watch: WatchRecord, sha: str) -> Build:
    """The spec that builds commit *sha* of a watched repo: a :class:`FactorySpec` or a :class:`SweepSpec`."""
    return build_spec(repo=watch.repo, kind=watch.kind, base=watch.base, fields=watch.spec,
                      sha=check_commit_sha(sha))


def spec_for_watched_commit(*, repo: str, sha: str, event: TriggerEvent, catalog: Catalog | None = None
                            ) -> Build:
    """What the ``on-finetune`` flow builds: commit *sha* of watched *repo*, with the watch's fields and gate."""
    from modelfactory.catalog import open_catalog

    watch = (catalog or open_catalog()).get_watch(repo)
    if watch is None:
        raise SpecError(f"{repo!r} is not on the watch list: add it with `modelfactory watch add {repo} --base BASE`")
    spec = spec_for_commit(watch=watch, sha=sha)
    get_logger().info(f"on-finetune ({event}): building {repo}@{sha[:12]} as {spec.name!r} "
                      f"({watch.kind} watch; base {spec.base.uri}; {describe_build(spec)})")
    return spec


def validate_watch(*, repo: str, kind: WatchKind, base: str | None, fields: dict[str, Any]) -> Build:
    """Check a watch before it is stored: its builds (runs or sweeps) must have a valid spec."""
    return build_spec(repo=repo, kind=kind, base=base, fields=fields, sha=PLACEHOLDER_SHA)


def watch_builds(watch: WatchRecord) -> Build | None:
    """The spec a build of *watch* would get (``watch ls``), or ``None`` when it is no longer valid (its
    stored fields were checked when it was added, but e.g. a relative base path can stop resolving)."""
    try:
        return validate_watch(repo=watch.repo, kind=watch.kind, base=watch.base, fields=watch.spec)
    except SpecError:
        return None
