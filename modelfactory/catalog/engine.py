"""The catalog's database URL and SQLAlchemy engine: parsing, masking, SQLite settings.

Only SQLite and PostgreSQL are supported. SQLite runs in WAL mode with a 30 s busy timeout and
foreign keys on (a fresh file's switch to WAL waits for a writer as long); a writing transaction
takes the write lock at its start (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from modelfactory.core.errors import CatalogError

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10
#: Execution option marking the engine whose transactions write (``BEGIN IMMEDIATE`` on SQLite).
WRITE_OPTION = "modelfactory_catalog_write"
URL_HINT = "e.g. sqlite:////abs/path/catalog.db or postgresql+psycopg://user@host:5432/db"


def mask_url(url: str | URL) -> str:
    """*url* with its password replaced by ``***`` (also for strings that do not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def parse_url(url: str) -> URL:
    """*url* parsed, or :class:`CatalogError` when it is no SQLite / PostgreSQL URL."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise CatalogError(
            f"catalog URL {mask_url(url)!r} is not a database URL ({exc}): "
            f"set MODELFACTORY_CATALOG_URL to one, {URL_HINT}"
        ) from exc
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise CatalogError(
            f"catalog URL {mask_url(parsed)!r} uses the unsupported database {backend!r}: "
            f"use SQLite or PostgreSQL, {URL_HINT}"
        )
    return parsed


def create_engine(url: URL) -> Engine:
    """An engine for the catalog at *url* (a SQLite file's folder is created); connects lazily."""
    if url.get_backend_name() == "sqlite":
        _make_sqlite_parent(url)
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        connect_args = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise CatalogError(
            f"cannot create a database engine for the catalog at {mask_url(url)}: {exc}; "
            f"check the driver in MODELFACTORY_CATALOG_URL, {URL_HINT}"
        ) from exc
    if url.get_backend_name() == "sqlite":
        _install_sqlite_hooks(engine)
    return engine


def _make_sqlite_parent(url: URL) -> None:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    parent = Path(database).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatalogError(
            f"cannot create the folder {str(parent)!r} of the SQLite catalog {mask_url(url)}: "
            f"{exc}; point MODELFACTORY_CATALOG_URL (or MODELFACTORY_HOME) at a writable place"
        ) from exc


def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL + foreign keys on every connection; SQLAlchemy (not sqlite3) emits BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let _on_begin control transactions
        cursor = dbapi_connection.cursor()
        try:
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the lock up front: a deferred transaction that reads and then
        # writes fails at once with SQLITE_BUSY instead of waiting for the timeout.
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _enable_wal(cursor: sqlite3.Cursor, *, timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Switch the database to WAL, waiting up to *timeout_s* for another connection's lock.

    Written by hand because SQLite's busy timeout does not cover it: on a database still in
    rollback-journal mode (a brand-new file) the switch reads, then upgrades to a write lock inside
    one statement, and SQLite answers ``database is locked`` at once, without waiting, when another
    connection holds the write lock (found as two processes opening one fresh catalog). Once the
    file is in WAL (the mode persists in the file) the pragma takes no write lock.
    """
    deadline = time.monotonic() + timeout_s
    delay_s = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay_s > deadline:
                raise
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.2)
