"""The catalog's schema version: Alembic configured in code, and the check that it is at head.

A new, empty database gets the current schema; an existing one behind the code's head is upgraded
only on request (``modelfactory catalog upgrade``), so no program silently migrates a shared database.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, text

from modelfactory.catalog.connections import CatalogConnections
from modelfactory.core.errors import CatalogError

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
#: ``pg_advisory_xact_lock`` key serialising concurrent schema upgrades.
UPGRADE_LOCK_KEY = 0x6D66_6361_7461  # "mfcata"


def alembic_config(*, connection: Connection | None = None) -> Config:
    """Alembic configuration built in code: no ``alembic.ini`` needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this code ships (what :meth:`Catalog.upgrade` migrates to)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def known_revision(revision: str) -> bool:
    """Whether this code ships migration *revision*."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


class CatalogSchema(CatalogConnections):
    """The schema revision of a catalog: read it, upgrade it, make sure it is at head."""

    def current_revision(self) -> str | None:
        """The Alembic revision of the database, ``None`` when it was never migrated."""
        with self._connection("read the schema revision") as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to *revision* (safe when several processes do it at once)."""
        with self._connection("upgrade the schema", write=True) as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})
            try:
                command.upgrade(alembic_config(connection=connection), revision)
            except CommandError as exc:
                raise CatalogError(
                    f"cannot upgrade the catalog at {self.url} to revision {revision!r}: {exc}; "
                    f"run `modelfactory catalog upgrade` without a revision to reach head"
                ) from exc

    def ensure_schema(self, *, auto_upgrade: bool = False) -> None:
        """Make sure the schema is at head, or raise :class:`CatalogError` saying what to do.

        - at head: nothing to do;
        - empty database (no Alembic revision, no tables): create the schema at head;
        - behind head: upgrade when *auto_upgrade*, else refuse (``modelfactory catalog upgrade``);
        - tables without a revision, or a revision this code does not know: refuse.
        """
        current, head = self.current_revision(), head_revision()
        if current is None and self._table_names():
            current = self.current_revision()  # another process may have just created it
        if current == head:
            return
        if current is not None and not known_revision(current):
            raise CatalogError(
                f"catalog at {self.url} is at revision {current}, which this version of "
                f"modelfactory does not know (its newest is {head}): upgrade modelfactory, "
                f"or point MODELFACTORY_CATALOG_URL at another catalog"
            )
        if current is None:
            if tables := self._table_names():
                raise CatalogError(
                    f"database at {self.url} has tables ({', '.join(sorted(tables)[:5])}) but no "
                    f"catalog schema revision: point MODELFACTORY_CATALOG_URL at an empty database or "
                    f"an existing catalog"
                )
            self.upgrade()  # a brand-new catalog
            return
        if not auto_upgrade:
            raise CatalogError(
                f"catalog at {self.url} is at schema revision {current}, this modelfactory needs "
                f"{head}: run `modelfactory catalog upgrade` (with the same MODELFACTORY_CATALOG_URL; "
                f"back the database up first if it matters)"
            )
        self.upgrade()

    def _table_names(self) -> list[str]:
        with self._connection("list the tables") as connection:
            return [t for t in inspect(connection).get_table_names() if t != "alembic_version"]
