"""Run and sweep ids as people type them: the full id, or a unique prefix of at least :data:`MIN_PREFIX` characters."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from modelfactory.catalog.models import Run, Sweep
from modelfactory.core.errors import CatalogNotFoundError, CatalogQueryError

#: Shortest id prefix :func:`resolve_run_id` / :func:`resolve_sweep_id` look up.
MIN_PREFIX = 6
#: How many matching ids an ambiguous prefix reports.
_SHOWN = 3


def resolve_run_id(session: Session, *, run_id: str, catalog_url: str) -> str:
    """*run_id* itself, or the one id it is a unique prefix of.

    Raises :class:`CatalogQueryError` for a prefix of several runs (the caller must say more) and
    :class:`CatalogNotFoundError` when no run matches (*catalog_url*, masked, names the catalog).
    """
    return _resolve(session, column=Run.id, ref=run_id, noun="run", catalog_url=catalog_url,
                    listing="modelfactory catalog ls")


def resolve_sweep_id(session: Session, *, sweep_id: str, catalog_url: str) -> str:
    """:func:`resolve_run_id` for sweeps: the full id, or the one sweep id it is a unique prefix of."""
    return _resolve(session, column=Sweep.id, ref=sweep_id, noun="sweep", catalog_url=catalog_url,
                    listing="modelfactory catalog sweeps")


def matching_ids(session: Session, *, column: InstrumentedAttribute[str], ref: str) -> list[str]:
    """``[ref]`` when it is an id in *column*, else up to 3 ids it is a prefix of (6+ characters).

    A prefix is tried as typed, then lower-cased (ids are lower-case UUIDs: ``ABCDEF12`` finds
    ``abcdef12-...``).
    """
    if session.scalar(select(column).where(column == ref)) is not None:
        return [ref]
    if len(ref) < MIN_PREFIX:
        return []
    matches = ids_with_prefix(session, prefix=ref, column=column)
    if not matches and ref != ref.lower():
        matches = ids_with_prefix(session, prefix=ref.lower(), column=column)
    return matches


def _resolve(session: Session, *, column: InstrumentedAttribute[str], ref: str, noun: str, catalog_url: str,
             listing: str) -> str:
    matches = matching_ids(session, column=column, ref=ref)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CatalogQueryError(
            f"{noun} id prefix {ref!r} matches several {noun}s ({', '.join(matches)}...): "
            f"give more characters of the id"
        )
    raise CatalogNotFoundError(
        f"no {noun} with id {ref!r} in the catalog at {catalog_url} (prefixes need "
        f"{MIN_PREFIX}+ characters), list {noun}s with `{listing}`"
    )


def ids_with_prefix(session: Session, *, prefix: str, column: InstrumentedAttribute[str] = Run.id) -> list[str]:
    """Up to 3 ids of *column* (runs by default) starting with *prefix* (case-sensitive), read from an index.

    SQLite: the range ``prefix <= id < next`` (*next*: the prefix with its last character
    incremented) on the primary key (``LIKE 'p%'`` is case-insensitive there and never uses an
    index). PostgreSQL: ``LIKE 'p%'`` on ``ix_runs_id_pattern`` / ``ix_sweeps_id_pattern``
    (``varchar_pattern_ops``: a byte-order index whatever the database collation, where a range on
    the primary key would follow the collation's order and miss ids under e.g. en_US).
    """
    if session.get_bind().dialect.name == "sqlite":
        match = column >= prefix
        if ord(prefix[-1]) < 0x10FFFF:
            match &= column < prefix[:-1] + chr(ord(prefix[-1]) + 1)
    else:
        escaped = prefix.replace("/", "//").replace("%", "/%").replace("_", "/_")
        match = column.like(escaped + "%", escape="/")
    found = session.scalars(select(column).where(match).order_by(column).limit(_SHOWN))
    return [found_id for found_id in found if found_id.startswith(prefix)]


def require_run_id(session: Session, *, run_id: str, catalog_url: str) -> None:
    """Raise :class:`CatalogNotFoundError` unless run *run_id* (exactly) exists: the check before a write."""
    if session.scalar(select(Run.id).where(Run.id == run_id)) is None:
        raise no_such_run(run_id=run_id, catalog_url=catalog_url)


def require_run(session: Session, *, run_id: str, catalog_url: str) -> Run:
    """Run *run_id* (exactly), or :class:`CatalogNotFoundError`."""
    run = session.get(Run, run_id)
    if run is None:
        raise no_such_run(run_id=run_id, catalog_url=catalog_url)
    return run


def no_such_run(*, run_id: str, catalog_url: str) -> CatalogNotFoundError:
    """The error of a write to a run that was never started."""
    return CatalogNotFoundError(
        f"no run with id {run_id!r} in the catalog at {catalog_url}: call start_run first "
        f"(list runs with `modelfactory catalog ls`)"
    )
