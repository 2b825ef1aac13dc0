"""How every catalog call reaches the database: one short connection (and transaction) per call.

:class:`CatalogConnections` is the base of :class:`~modelfactory.catalog.db.Catalog`: it owns the
engine and turns every database failure into a :class:`CatalogError` naming the catalog (password
masked) and what the call tried to do. Wrong values and missing rows are the callers' business
(:class:`CatalogQueryError`, :class:`CatalogNotFoundError`), so a plain :class:`CatalogError`
always means the database itself failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from modelfactory.catalog.engine import WRITE_OPTION, mask_url
from modelfactory.core.errors import CatalogError


class CatalogConnections:
    """The engine of a catalog and its connections, sessions and transactions (thread-safe)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self._sessions = sessionmaker(expire_on_commit=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.dispose()

    @property
    def url(self) -> str:
        """The database URL, password masked: safe to print."""
        return mask_url(self._engine.url)

    @property
    def engine(self) -> Engine:
        return self._engine

    def dispose(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    @contextmanager
    def reading(self, what: str) -> Iterator[Session]:
        """A read-only session (for the query functions of ``modelfactory.catalog.queries`` too).

        *what* completes "failed to ..." in the :class:`CatalogError` raised on a database error.
        """
        with self._connection(what) as connection:
            with self._sessions(bind=connection) as session:
                yield session

    @contextmanager
    def writing(self, what: str) -> Iterator[Session]:
        """A session in its own write transaction, committed on success."""
        with self._connection(what, write=True) as connection:
            with self._sessions(bind=connection) as session:
                yield session
                session.flush()

    @contextmanager
    def _connection(self, what: str, *, write: bool = False) -> Iterator[Connection]:
        """A connection (in a committed-on-exit transaction when *write*); errors → CatalogError."""
        engine = self._write_engine if write else self._engine
        try:
            connection = engine.connect()
        except SQLAlchemyError as exc:
            raise CatalogError(
                f"cannot connect to the catalog at {self.url} to {what}: {self._reason(exc)}; "
                f"is the database running? check MODELFACTORY_CATALOG_URL"
            ) from exc
        try:
            with connection:
                if write:
                    with connection.begin():
                        yield connection
                else:
                    yield connection
        except SQLAlchemyError as exc:
            raise CatalogError(
                f"catalog at {self.url} failed to {what}: {self._reason(exc)}; check that the "
                f"database is reachable and its schema current (`modelfactory catalog upgrade`)"
            ) from exc

    def _reason(self, exc: SQLAlchemyError) -> str:
        """The driver's one-line reason for *exc*, with the URL's password scrubbed."""
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        line = reason[0] if reason else type(exc).__name__
        password = self._engine.url.password
        return line.replace(str(password), "***") if password else line
