"""Run ids as people type them: the full id, or a unique prefix of at least :data:`MIN_PREFIX` characters."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from modelfactory.catalog.models import Run
from modelfactory.core.errors import CatalogNotFoundError, CatalogQueryError

#: Shortest id prefix :func:`resolve_run_id` looks up.
MIN_PREFIX = 6
#: How many matching ids an ambiguous prefix reports.
_SHOWN = 3


def resolve_run_id(session: Session, *, run_id: str, catalog_url: str) -> str:
    """*run_id* itself, or the one id it is a unique prefix of.

    Raises :class:`CatalogQueryError` for a prefix of several runs (the caller must say more) and
    :class:`CatalogNotFoundError` when no run matches (*catalog_url*, masked, names the catalog).
    """
    if session.scalar(select(Run.id).where(Run.id == run_id)) is not None:
        return run_id
    if len(run_id) >= MIN_PREFIX:
        matches = ids_with_prefix(session, prefix=run_id)
        if not matches and run_id != run_id.lower():  # ids are lowercase UUIDs: ABCDEF12 finds abcdef12-...
            matches = ids_with_prefix(session, prefix=run_id.lower())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CatalogQueryError(
                f"run id prefix {run_id!r} matches several runs ({', '.join(matches)}...): "
                f"give more characters of the id"
            )
    raise CatalogNotFoundError(
        f"no run with id {run_id!r} in the catalog at {catalog_url} (prefixes need "
        f"{MIN_PREFIX}+ characters), list runs with `modelfactory catalog ls`"
    )


def ids_with_prefix(session: Session, *, prefix: str) -> list[str]:
    """Up to 3 run ids starting with *prefix* (case-sensitive), read from an index.

    SQLite: the range ``prefix <= id < next`` (*next*: the prefix with its last character
    incremented) on the primary key (``LIKE 'p%'`` is case-insensitive there and never uses an
    index). PostgreSQL: ``LIKE 'p%'`` on ``ix_runs_id_pattern`` (``varchar_pattern_ops``: a
    byte-order index whatever the database collation, where a range on the primary key would
    follow the collation's order and miss ids under e.g. en_US).
    """
    if session.get_bind().dialect.name == "sqlite":
        match = Run.id >= prefix
        if ord(prefix[-1]) < 0x10FFFF:
            match &= Run.id < prefix[:-1] + chr(ord(prefix[-1]) + 1)
    else:
        escaped = prefix.replace("/", "//").replace("%", "/%").replace("_", "/_")
        match = Run.id.like(escaped + "%", escape="/")
    found = session.scalars(select(Run.id).where(match).order_by(Run.id).limit(_SHOWN))
    return [run_id for run_id in found if run_id.startswith(prefix)]


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
