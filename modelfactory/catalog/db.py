"""The run catalog: one SQL database (SQLite or PostgreSQL) recording every factory run.

Open it with :func:`open_catalog`; every write is its own short transaction, so a crash
mid-run leaves what was recorded so far. Several processes may write to the same
catalog: SQLite runs in WAL mode with a 30 s busy timeout and takes the write lock at
the start of each write transaction (``BEGIN IMMEDIATE``); upserts are single
``INSERT ... ON CONFLICT`` statements on both backends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    delete,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, load_only, selectinload, sessionmaker

from modelfactory.catalog.models import (
    AdapterVersion,
    Artifact,
    BaseModelVersion,
    GateCheck,
    Metric,
    Publication,
    Run,
    RunAdapter,
    Step,
    Watch,
    WebhookDelivery,
    utcnow,
)
from modelfactory.catalog.records import (
    DELIVERY_STATUSES,
    FINAL_RUN_STATUSES,
    METRIC_SIDES,
    PUBLICATION_DESTINATIONS,
    RUN_STATUSES,
    STEP_STATUSES,
    WATCH_KINDS,
    ArtifactRecord,
    DeliveryRecord,
    GateCheckRecord,
    MetricRecord,
    PublicationRecord,
    RunDetail,
    RunSummary,
    StepRecord,
    WatchRecord,
    quant_columns,
)
from modelfactory.core.errors import CatalogError, CatalogNotFoundError

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
#: Shortest id prefix :meth:`Catalog.get_run` accepts.
MIN_PREFIX = 6
SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10
#: Execution option marking the engine whose transactions write (``BEGIN IMMEDIATE`` on SQLite).
_WRITE_OPTION = "modelfactory_catalog_write"
#: ``pg_advisory_xact_lock`` key serialising concurrent schema upgrades.
_UPGRADE_LOCK_KEY = 0x6D66_6361_7461  # "mfcata"
#: ``delta`` metrics copied onto the run row (indexed columns for ls sorting and best).
RATIO_COLUMNS = ("ppl_increase_pct", "decode_speedup", "size_ratio", "memory_ratio")
_URL_HINT = "e.g. sqlite:////abs/path/catalog.db or postgresql+psycopg://user@host:5432/db"


# --------------------------------------------------------------------------- opening


def open_catalog(url: str | None = None, *, auto_upgrade: bool = False) -> Catalog:
    """Connect to the catalog at *url* (default: ``MODELFACTORY_CATALOG_URL`` / settings).

    An empty database (a new SQLite file, an empty PostgreSQL schema) gets the current schema.
    An existing catalog behind the code's Alembic head is upgraded only when *auto_upgrade*
    (what ``modelfactory catalog upgrade`` does); otherwise :class:`CatalogError` tells the
    user to run that command, so no program silently migrates a shared database.
    """
    if url is None:
        from modelfactory.core.settings import get_settings

        url = get_settings().resolved_catalog_url
    catalog = Catalog(_create_engine(_parse_url(url)))
    try:
        catalog.ensure_schema(auto_upgrade=auto_upgrade)
    except BaseException:
        catalog.dispose()
        raise
    return catalog


def mask_url(url: str | URL) -> str:
    """*url* with its password replaced by ``***`` (also for strings that do not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise CatalogError(
            f"catalog URL {mask_url(url)!r} is not a database URL ({exc}): "
            f"set MODELFACTORY_CATALOG_URL to one, {_URL_HINT}"
        ) from exc
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise CatalogError(
            f"catalog URL {mask_url(parsed)!r} uses the unsupported database {backend!r}: "
            f"use SQLite or PostgreSQL, {_URL_HINT}"
        )
    return parsed


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        _make_sqlite_parent(url)
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        connect_args = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    try:
        engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise CatalogError(
            f"cannot create a database engine for the catalog at {mask_url(url)}: {exc}; "
            f"check the driver in MODELFACTORY_CATALOG_URL, {_URL_HINT}"
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
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the lock up front: a deferred transaction that reads and then
        # writes fails at once with SQLITE_BUSY instead of waiting for the timeout.
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration built in code: no ``alembic.ini`` needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this code ships (what :meth:`Catalog.upgrade` migrates to)."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def _known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


# --------------------------------------------------------------------------- catalog


class Catalog:
    """Reads and writes of the run catalog (thread-safe: one short session per call)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._sessions = sessionmaker(expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Catalog({self.url!r})"

    def __enter__(self) -> Catalog:
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

    # ---------------------------------------------------------------- schema

    def current_revision(self) -> str | None:
        """The Alembic revision of the database, ``None`` when it was never migrated."""
        with self._connection("read the schema revision") as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to *revision* (safe when several processes do it at once)."""
        with self._connection("upgrade the schema", write=True) as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK_KEY})
            try:
                command.upgrade(_alembic_config(connection), revision)
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
        if current is not None and not _known_revision(current):
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

    @contextmanager
    def reading(self, what: str) -> Iterator[Session]:
        """A read-only session for the query functions (``modelfactory.catalog.queries``).

        *what* completes "failed to ..." in the :class:`CatalogError` raised on a database error.
        """
        with self._read(what) as session:
            yield session

    # ---------------------------------------------------------------- writes

    def start_run(
        self,
        *,
        run_id: str,
        name: str,
        spec: dict[str, Any],
        run_key: str,
        flow_run_id: str | None = None,
        library_versions: dict[str, Any] | None = None,
        host: dict[str, Any] | None = None,
    ) -> None:
        """Record a new run in status ``running``, started now (UTC)."""
        run = Run(
            id=run_id,
            flow_run_id=flow_run_id,
            name=name,
            status="running",
            run_key=run_key,
            spec=spec,
            adapters=[],
            library_versions=library_versions or {},
            host=host or {},
            started_at=utcnow(),
            **quant_columns(spec),
        )
        with self._write(f"start run {run_id!r}") as session:
            session.add(run)
            try:
                session.flush()
            except IntegrityError as exc:
                raise CatalogError(
                    f"run id {run_id!r} already exists in the catalog at {self.url}: "
                    f"start every run with a fresh id (uuid4)"
                ) from exc

    def set_sources(
        self, *, run_id: str, base_uri: str, base_sha: str, adapters: list[dict[str, Any]]
    ) -> None:
        """Record the resolved base model and adapters ({uri, sha, weight}) of a run."""
        with self._write(f"set the sources of run {run_id!r}") as session:
            run = self._require_run(session, run_id)
            run.base_uri, run.base_sha = base_uri, base_sha
            run.adapters = [dict(adapter) for adapter in adapters]
            run.base_model_id = _version_id(session, BaseModelVersion, base_uri, base_sha)
            session.execute(delete(RunAdapter).where(RunAdapter.run_id == run_id))
            session.add_all(
                RunAdapter(
                    run_id=run_id,
                    position=position,
                    adapter_id=_version_id(session, AdapterVersion, adapter["uri"], adapter["sha"]),
                    weight=float(adapter.get("weight", 1.0)),
                )
                for position, adapter in enumerate(adapters)
            )

    def record_step(
        self,
        *,
        run_id: str,
        name: str,
        status: str,
        duration_s: float,
        output_uri: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record (or overwrite) the outcome of step *name* of a run."""
        _check_choice("step status", status, STEP_STATUSES)
        row = {
            "run_id": run_id,
            "name": name,
            "status": status,
            "duration_s": float(duration_s),
            "output_uri": output_uri,
            "detail": detail,
            "recorded_at": utcnow(),
        }
        with self._write(f"record step {name!r} of run {run_id!r}") as session:
            self._require_run_id(session, run_id)
            _upsert(session, Step, [row], keys=("run_id", "name"))

    def record_metrics(self, *, run_id: str, metrics: Sequence[MetricRecord]) -> None:
        """Record (or overwrite, per name and side) measured metrics of a run."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for metric in metrics:  # one row per key: a statement may not touch a row twice
            _check_choice(f"side of metric {metric.name!r}", metric.side, METRIC_SIDES)
            rows[(metric.name, metric.side)] = {
                "run_id": run_id,
                "name": metric.name,
                "side": metric.side,
                "value": float(metric.value),
                "unit": metric.unit,
            }
        if not rows:
            return
        with self._write(f"record metrics of run {run_id!r}") as session:
            self._require_run_id(session, run_id)
            _upsert(session, Metric, list(rows.values()), keys=("run_id", "name", "side"))
            ratios = {name: row["value"] for (name, side), row in rows.items()
                      if side == "delta" and name in RATIO_COLUMNS}
            if ratios:  # the denormalised copies ls / best sort and filter on
                session.execute(update(Run).where(Run.id == run_id).values(**ratios))

    def record_gate(self, *, run_id: str, checks: Sequence[GateCheckRecord]) -> None:
        """Record the gate verdict of a run, replacing any previous one."""
        with self._write(f"record the gate of run {run_id!r}") as session:
            self._require_run_id(session, run_id)
            session.execute(delete(GateCheck).where(GateCheck.run_id == run_id))
            session.add_all(
                GateCheck(
                    run_id=run_id,
                    metric=check.metric,
                    threshold=check.threshold,
                    baseline=check.baseline,
                    candidate=check.candidate,
                    observed=check.observed,
                    passed=bool(check.passed),
                    message=check.message,
                )
                for check in checks
            )

    def record_artifact(
        self, *, run_id: str, kind: str, uri: str, manifest_sha256: str | None, size_bytes: int
    ) -> None:
        """Record a published artifact of a run."""
        artifact = Artifact(
            run_id=run_id,
            kind=kind,
            uri=uri,
            manifest_sha256=manifest_sha256,
            size_bytes=int(size_bytes),
            created_at=utcnow(),
        )
        with self._write(f"record artifact {uri!r} of run {run_id!r}") as session:
            self._require_run_id(session, run_id)
            session.add(artifact)

    def finish_run(
        self, *, run_id: str, status: str, error: str | None = None, error_kind: str | None = None
    ) -> None:
        """Close a run with status passed, failed or rejected (finished now, UTC)."""
        _check_choice("final run status", status, FINAL_RUN_STATUSES)
        with self._write(f"finish run {run_id!r}") as session:
            run = self._require_run(session, run_id)
            run.status, run.finished_at = status, utcnow()
            run.error, run.error_kind = error, error_kind

    def record_publication(self, *, run_id: str, publication: PublicationRecord) -> None:
        """Record one destination a run's artifact was published to."""
        _check_choice("publication destination", publication.destination, PUBLICATION_DESTINATIONS)
        row = Publication(
            run_id=run_id,
            destination=publication.destination,
            uri=publication.uri,
            revision=publication.revision,
            commit_sha=publication.commit_sha,
            manifest_sha256=publication.manifest_sha256,
            size_bytes=int(publication.size_bytes),
            reused=bool(publication.reused),
            published_at=publication.published_at or utcnow(),
        )
        with self._write(f"record publication {publication.uri!r} of run {run_id!r}") as session:
            self._require_run_id(session, run_id)
            session.add(row)

    # ---------------------------------------------------------------- watch list

    def add_watch(
        self,
        *,
        repo: str,
        kind: str = "adapter",
        base: str | None = None,
        revision: str = "main",
        spec: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> WatchRecord:
        """Watch *repo* (an adapter repo on top of *base*, or a base model repo)."""
        _check_choice("watch kind", kind, WATCH_KINDS)
        if kind == "adapter" and not base:
            raise CatalogError(f"watching adapter repo {repo!r} needs its base model: give base=...")
        now = utcnow()
        row = {"repo": repo, "kind": kind, "base": base, "revision": revision, "spec": spec or {},
               "last_sha": None, "created_at": now, "updated_at": now}
        with self._write(f"add watch {repo!r}") as session:
            existing = session.scalar(select(Watch).where(Watch.repo == repo))
            if existing is not None and not replace:
                raise CatalogError(
                    f"{repo!r} is already on the watch list: remove it first "
                    f"(`modelfactory watch rm {repo}`) or replace it"
                )
            if existing is not None:
                session.delete(existing)
                session.flush()
            watch = Watch(**row)
            session.add(watch)
            session.flush()
            return _watch(watch)

    def list_watches(self) -> list[WatchRecord]:
        with self._read("list watches") as session:
            return [_watch(w) for w in session.scalars(select(Watch).order_by(Watch.repo))]

    def get_watch(self, repo: str) -> WatchRecord | None:
        with self._read(f"read watch {repo!r}") as session:
            watch = session.scalar(select(Watch).where(Watch.repo == repo))
            return _watch(watch) if watch is not None else None

    def remove_watch(self, repo: str) -> bool:
        """Stop watching *repo*; ``False`` when it was not watched."""
        with self._write(f"remove watch {repo!r}") as session:
            return session.execute(delete(Watch).where(Watch.repo == repo)).rowcount > 0

    def set_watch_sha(self, repo: str, sha: str) -> None:
        """Remember the commit of *repo* the factory last ran for."""
        with self._write(f"update watch {repo!r}") as session:
            watch = session.scalar(select(Watch).where(Watch.repo == repo))
            if watch is None:
                raise CatalogError(f"{repo!r} is not on the watch list: add it with `modelfactory watch add`")
            watch.last_sha, watch.updated_at = sha, utcnow()

    # ---------------------------------------------------------------- webhook deliveries

    def claim_delivery(
        self, *, repo: str, sha: str, event: str, delivery_id: str | None = None
    ) -> tuple[bool, DeliveryRecord]:
        """Claim (repo, sha) for one run: ``(True, new)`` the first time, ``(False, existing)`` after.

        Atomic across processes (unique constraints), so retried and replayed deliveries, and a
        burst of identical ones, start one run. A delivery id seen before is a replay even for
        another SHA: ``(False, that delivery)``.
        """
        row = WebhookDelivery(repo=repo, sha=sha, event=event, status="accepted", delivery_id=delivery_id,
                              received_at=utcnow())
        try:
            with self._write(f"claim delivery {repo}@{sha}") as session:
                session.add(row)
                session.flush()
                return True, _delivery(row)
        except CatalogError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
        with self._read(f"read delivery {repo}@{sha}") as session:
            same = (WebhookDelivery.repo == repo) & (WebhookDelivery.sha == sha)
            if delivery_id is not None:
                same = same | (WebhookDelivery.delivery_id == delivery_id)
            stmt = select(WebhookDelivery).where(same).limit(1)
            existing = session.scalar(stmt)
            assert existing is not None, "integrity error without a conflicting row"
            return False, _delivery(existing)

    def update_delivery(
        self, *, repo: str, sha: str, status: str, flow_run_id: str | None = None, detail: str | None = None
    ) -> None:
        _check_choice("delivery status", status, DELIVERY_STATUSES)
        with self._write(f"update delivery {repo}@{sha}") as session:
            delivery = session.scalar(
                select(WebhookDelivery).where(WebhookDelivery.repo == repo, WebhookDelivery.sha == sha)
            )
            if delivery is None:
                raise CatalogError(f"no webhook delivery for {repo}@{sha}: claim it first")
            delivery.status, delivery.flow_run_id, delivery.detail = status, flow_run_id, detail

    def list_deliveries(self, *, repo: str | None = None, limit: int = 100) -> list[DeliveryRecord]:
        stmt = select(WebhookDelivery).order_by(WebhookDelivery.received_at.desc()).limit(limit)
        if repo is not None:
            stmt = stmt.where(WebhookDelivery.repo == repo)
        with self._read("list webhook deliveries") as session:
            return [_delivery(d) for d in session.scalars(stmt)]

    # ---------------------------------------------------------------- reads

    def list_runs(
        self, *, status: str | None = None, base_sha: str | None = None, limit: int = 50
    ) -> list[RunSummary]:
        """Runs newest first, optionally only those with *status* / built on *base_sha*."""
        if status is not None:
            _check_choice("run status", status, RUN_STATUSES)
        if limit < 1:
            raise CatalogError(f"cannot list {limit} runs: give a limit of at least 1")
        stmt = (
            select(Run)
            .options(load_only(*_SUMMARY_COLUMNS))
            .order_by(Run.started_at.desc(), Run.id.desc())
            .limit(limit)
        )
        if status is not None:
            stmt = stmt.where(Run.status == status)
        if base_sha is not None:
            stmt = stmt.where(Run.base_sha == base_sha)
        with self._read("list runs") as session:
            return [RunSummary(**_summary_fields(run)) for run in session.scalars(stmt)]

    def get_run(self, run_id: str) -> RunDetail:
        """Everything about run *run_id* (a unique prefix of at least 6 characters will do)."""
        with self._read(f"read run {run_id!r}") as session:
            full_id = self._resolve_id(session, run_id)
            run = session.get(Run, full_id, options=_DETAIL_LOADS)
            assert run is not None
            return _detail(run)

    # ---------------------------------------------------------------- helpers

    def resolve_id(self, session: Session, run_id: str) -> str:
        """The full id of run *run_id* (itself or a unique 6+ character prefix), else raise."""
        return self._resolve_id(session, run_id)

    def _resolve_id(self, session: Session, run_id: str) -> str:
        """*run_id* itself, or the one id it is a unique prefix of."""
        if session.scalar(select(Run.id).where(Run.id == run_id)) is not None:
            return run_id
        if len(run_id) >= MIN_PREFIX:
            matches = self._ids_with_prefix(session, run_id)
            if not matches and run_id != run_id.lower():  # ids are lowercase UUIDs: ABCDEF12 finds abcdef12-...
                matches = self._ids_with_prefix(session, run_id.lower())
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise CatalogError(
                    f"run id prefix {run_id!r} matches several runs ({', '.join(matches)}...): "
                    f"give more characters of the id"
                )
        raise CatalogNotFoundError(
            f"no run with id {run_id!r} in the catalog at {self.url} (prefixes need "
            f"{MIN_PREFIX}+ characters), list runs with `modelfactory catalog ls`"
        )

    @staticmethod
    def _ids_with_prefix(session: Session, prefix: str) -> list[str]:
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
        found = session.scalars(select(Run.id).where(match).order_by(Run.id).limit(3))
        return [run_id for run_id in found if run_id.startswith(prefix)]

    def _require_run(self, session: Session, run_id: str) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise self._no_run(run_id)
        return run

    def _require_run_id(self, session: Session, run_id: str) -> None:
        if session.scalar(select(Run.id).where(Run.id == run_id)) is None:
            raise self._no_run(run_id)

    def _no_run(self, run_id: str) -> CatalogError:
        return CatalogNotFoundError(
            f"no run with id {run_id!r} in the catalog at {self.url}: call start_run first "
            f"(list runs with `modelfactory catalog ls`)"
        )

    @contextmanager
    def _write(self, what: str) -> Iterator[Session]:
        """A session in its own write transaction, committed on success."""
        with self._connection(what, write=True) as connection:
            with self._sessions(bind=connection) as session:
                yield session
                session.flush()

    @contextmanager
    def _read(self, what: str) -> Iterator[Session]:
        with self._connection(what) as connection:
            with self._sessions(bind=connection) as session:
                yield session

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


# --------------------------------------------------------------------------- helpers

_SUMMARY_COLUMNS = (
    Run.id,
    Run.name,
    Run.status,
    Run.run_key,
    Run.base_uri,
    Run.base_sha,
    Run.started_at,
    Run.finished_at,
    Run.error,
    Run.config,
)
_DETAIL_LOADS = [
    selectinload(Run.steps),
    selectinload(Run.metrics),
    selectinload(Run.gate_checks),
    selectinload(Run.artifacts),
    selectinload(Run.publications),
]


def _check_choice(what: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise CatalogError(f"{what} {value!r} is not one of {choices}: use one of those")


def _upsert(session: Session, model: type, rows: list[dict[str, Any]], *, keys: Sequence[str]) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` of every other column (SQLite and PostgreSQL)."""
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    stmt = insert(model).values(rows)
    updates = {column: stmt.excluded[column] for column in rows[0] if column not in keys}
    session.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates))


def _aware(value: datetime | None) -> datetime | None:
    """*value* in UTC (SQLite hands back naive datetimes, which the catalog writes in UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _summary_fields(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "run_key": run.run_key,
        "base_uri": run.base_uri,
        "base_sha": run.base_sha,
        "started_at": _aware(run.started_at),
        "finished_at": _aware(run.finished_at),
        "error": run.error,
        "config": run.config,
    }


def _detail(run: Run) -> RunDetail:
    return RunDetail(
        **_summary_fields(run),
        spec=run.spec,
        adapters=run.adapters,
        library_versions=run.library_versions,
        host=run.host,
        error_kind=run.error_kind,
        steps=tuple(
            StepRecord(s.name, s.status, s.duration_s, s.output_uri, s.detail) for s in run.steps
        ),
        metrics=tuple(MetricRecord(m.name, m.side, m.value, m.unit) for m in run.metrics),
        gate_checks=tuple(
            GateCheckRecord(g.metric, g.threshold, g.baseline, g.candidate, g.observed, g.passed, g.message)
            for g in run.gate_checks
        ),
        artifacts=tuple(
            ArtifactRecord(a.kind, a.uri, a.manifest_sha256, a.size_bytes) for a in run.artifacts
        ),
        publications=tuple(
            PublicationRecord(p.destination, p.uri, p.manifest_sha256, p.size_bytes, p.revision, p.commit_sha,
                              p.reused, _aware(p.published_at))
            for p in run.publications
        ),
    )


def _version_id(session: Session, model: type, uri: str, sha: str) -> int:
    """Id of the (uri, sha) row of *model* (base model / adapter version), inserted if new."""
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    session.execute(
        insert(model).values(uri=uri, sha=sha, first_seen=utcnow()).on_conflict_do_nothing(
            index_elements=["uri", "sha"]
        )
    )
    found = session.scalar(select(model.id).where(model.uri == uri, model.sha == sha))
    assert found is not None
    return found


def _watch(w: Watch) -> WatchRecord:
    return WatchRecord(w.repo, w.kind, w.base, w.revision, dict(w.spec or {}), w.last_sha,
                       _aware(w.created_at), _aware(w.updated_at))


def _delivery(d: WebhookDelivery) -> DeliveryRecord:
    return DeliveryRecord(d.repo, d.sha, d.event, d.status, d.delivery_id, d.flow_run_id, d.detail,
                          _aware(d.received_at))
