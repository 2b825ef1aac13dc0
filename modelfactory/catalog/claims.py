"""Run-key claims: one build of a run key at a time, across hosts, through the catalog database.

Two identical runs (same spec, hence the same run key) started together, on one host or on
two: the first to claim the key builds; the other waits here until the claim is gone, then
finds every step output complete (work dir or stage store) and reuses it.

- :func:`claim` is one atomic statement on SQLite and PostgreSQL alike: ``INSERT`` the row, or
  ``ON CONFLICT (run_key) DO UPDATE ... WHERE expires_at < now`` (take over an expired claim),
  ``RETURNING`` the token when this caller got it. The database's uniqueness decides the race.
- The holder renews its lease (``MODELFACTORY_CLAIM_LEASE_S``, default 60 s) from a heartbeat
  thread every third of it; a holder that dies (process killed, host gone) stops renewing and
  its claim expires, so a crashed run blocks the next one for at most one lease.
- :func:`holding` claims, polls while another run holds the key (``MODELFACTORY_CLAIM_POLL_S``)
  with a progress line saying who holds it, for at most ``MODELFACTORY_CLAIM_WAIT_S`` (then a
  :class:`~modelfactory.core.errors.ClaimError` names the holder), heartbeats, and releases on exit
  (only its own claim: every statement is keyed by the claim's token).
- A holder whose lease expired and was taken by another run has *lost* the claim: its heartbeat
  marks it (:attr:`Claim.lost`), and from then on every write fenced by it
  (:meth:`Claim.check`: the run's catalog records, its publication) raises :class:`ClaimError`
  instead of going on next to the new holder.

Why the catalog and not Prefect's global concurrency limits: the catalog is the one database
every factory process already writes to (in-process runs with an ephemeral Prefect API
included), a claim row says who holds the key and since when (``run_claims``), and expiry is
a plain comparison we control. A concurrency-limit slot per run key would need one limit
object per key created on the fly, and a slot held by a killed process is only freed by the
limit's slot decay, not by the holder's heartbeat.

Every lease time (claimed, renewed, expires) is the database's clock, read in the statement's own
transaction (:func:`database_now`), never a host's: hosts whose clocks disagree still agree on
whether a claim expired.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from modelfactory.catalog.db import Catalog
from modelfactory.catalog.models import RunClaim
from modelfactory.core.errors import CatalogError, ClaimError
from modelfactory.core.log import get_logger
from modelfactory.core.settings import get_settings

#: Seconds between "still waiting" lines of a run waiting for an identical one.
WAIT_NOTE_EVERY_S = 30.0


@dataclass(frozen=True)
class Claim:
    """A claim this process holds (its *token* identifies it in every statement)."""

    run_key: str
    holder: str
    token: str
    lease_s: float
    #: Set by the heartbeat when the lease expired and another run took the key: this holder must stop.
    lost: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def check(self) -> None:
        """Raise :class:`ClaimError` when this claim was lost (the fence before a write)."""
        if self.lost.is_set():
            raise ClaimError(
                f"the claim on run key {self.run_key[:12]} held by {self.holder} was lost: its lease "
                f"({self.lease_s:.0f} s) expired without a heartbeat (the process stalled or lost the database) "
                "and another run took the key. This run stops here so the two never write the same outputs; "
                "run it again (finished steps are reused)")


@dataclass(frozen=True)
class ClaimState:
    """A claim row as another process sees it, and the database's time when it was read."""

    run_key: str
    holder: str
    claimed_at: datetime
    renewed_at: datetime
    expires_at: datetime
    read_at: datetime


def holder_name(run_id: str) -> str:
    """Who holds a claim, as the waiting runs print it: host, process and run."""
    return f"{socket.gethostname()} pid {os.getpid()} run {run_id}"[:255]


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored value is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def database_now(connection: Connection) -> datetime:
    """The database's current UTC time (PostgreSQL: the transaction's ``now()``; SQLite: ``'now'``)."""
    if connection.dialect.name == "postgresql":
        return _utc(connection.execute(text("SELECT now()")).scalar_one())
    stamp = connection.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC)


@contextmanager
def _database(catalog: Catalog, what: str) -> Iterator:
    """A connection in one committed transaction; database errors become :class:`CatalogError`."""
    try:
        with catalog.engine.begin() as connection:
            yield connection
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise CatalogError(f"catalog at {catalog.url} failed to {what}: {reason[0] if reason else type(exc).__name__}; "
                           "check that the database is reachable and its schema current "
                           "(`modelfactory catalog upgrade`)") from exc


def claim(catalog: Catalog, *, run_key: str, holder: str, lease_s: float) -> Claim | None:
    """Claim *run_key* for *holder* for *lease_s* seconds; ``None`` while someone else holds it."""
    token = uuid.uuid4().hex
    with _database(catalog, f"claim run key {run_key}") as connection:
        now = database_now(connection)
        values = {"run_key": run_key, "holder": holder, "token": token, "claimed_at": now, "renewed_at": now,
                  "expires_at": now + timedelta(seconds=lease_s)}
        insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
        statement = insert(RunClaim).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[RunClaim.run_key],
            set_={name: statement.excluded[name] for name in values if name != "run_key"},
            where=RunClaim.expires_at < now,  # only an expired claim is taken over
        ).returning(RunClaim.token)
        got = connection.execute(statement).scalar()
    return Claim(run_key=run_key, holder=holder, token=token, lease_s=lease_s) if got == token else None


def renew(catalog: Catalog, held: Claim) -> bool:
    """Extend *held*'s lease; ``False`` when it is no longer this process's (it expired and was taken)."""
    with _database(catalog, f"renew the claim on run key {held.run_key}") as connection:
        now = database_now(connection)
        result = connection.execute(
            update(RunClaim).where(RunClaim.run_key == held.run_key, RunClaim.token == held.token)
            .values(renewed_at=now, expires_at=now + timedelta(seconds=held.lease_s)))
    return result.rowcount == 1


def release(catalog: Catalog, held: Claim) -> None:
    """Drop *held* (a claim taken over by another run meanwhile is left alone)."""
    with _database(catalog, f"release the claim on run key {held.run_key}") as connection:
        connection.execute(delete(RunClaim).where(RunClaim.run_key == held.run_key, RunClaim.token == held.token))


def current(catalog: Catalog, run_key: str) -> ClaimState | None:
    """The claim row of *run_key* (possibly expired), or ``None``."""
    with _database(catalog, f"read the claim on run key {run_key}") as connection:
        row = connection.execute(select(RunClaim).where(RunClaim.run_key == run_key)).first()
        now = database_now(connection)
    if row is None:
        return None
    return ClaimState(run_key=row.run_key, holder=row.holder, claimed_at=_utc(row.claimed_at),
                      renewed_at=_utc(row.renewed_at), expires_at=_utc(row.expires_at), read_at=now)


def waiting_line(run_key: str, state: ClaimState | None, *, waited_s: float) -> str:
    """The progress line of a run waiting for *state*'s holder."""
    head = f"an identical run (key {run_key[:12]}) is in progress"
    if state is None:
        return f"{head}: it just finished; claiming the key (waited {waited_s:.0f} s)"
    now = state.read_at
    return (f"{head} on {state.holder} (claimed {(now - state.claimed_at).total_seconds():.0f} s ago, lease "
            f"renewed {(now - state.renewed_at).total_seconds():.0f} s ago): waiting for it to finish, then "
            f"reusing its outputs (waited {waited_s:.0f} s; a dead holder's claim expires "
            f"{max(0.0, (state.expires_at - now).total_seconds()):.0f} s after its last renewal)")


class _Heartbeat(threading.Thread):
    """Renews a claim every third of its lease until stopped; never raises."""

    def __init__(self, catalog: Catalog, held: Claim) -> None:
        super().__init__(name=f"claim-heartbeat-{held.run_key[:12]}", daemon=True)
        self.catalog, self.held = catalog, held
        self.stopped = threading.Event()

    def run(self) -> None:
        lost = False
        while not self.stopped.wait(self.held.lease_s / 3):
            try:
                if not renew(self.catalog, self.held) and not lost:
                    lost = True
                    self.held.lost.set()  # the fence: this run's next write raises ClaimError
                    get_logger().error(
                        f"the claim on run key {self.held.run_key[:12]} expired and was taken by another run "
                        f"(heartbeats missed for over {self.held.lease_s:.0f} s): this run stops at its next "
                        "write, so it never records or publishes next to the new holder")
                    return
            except Exception as exc:  # noqa: BLE001 - a database blip must not kill the run; retried next beat
                get_logger().warning(f"could not renew the claim on run key {self.held.run_key[:12]}: {exc}")

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


def alive_key(kind: str, ident: str) -> str:
    """The lease key saying run or sweep *ident* is alive (:func:`keep_alive`)."""
    return f"alive:{kind}:{ident}"


def keep_alive(catalog: Catalog, key: str, *, holder: str, lease_s: float | None = None) -> Callable[[], None]:
    """Hold the lease *key* (:func:`alive_key`) while this process lives: a run or sweep says it is alive to
    ``modelfactory catalog reconcile``, which closes those whose lease expired (the process died). Returns
    the function that ends it (release)."""
    held = claim(catalog, run_key=key, holder=holder, lease_s=lease_s or get_settings().claim_lease_s)
    if held is None:
        state = current(catalog, key)
        raise ClaimError(f"{key} is already held by {state.holder if state else 'another process'}: a run or sweep "
                         "id is started by one process at a time")
    beat = _Heartbeat(catalog, held)
    beat.start()

    def stop() -> None:
        beat.stop()
        try:
            release(catalog, held)
        except CatalogError as exc:  # it expires anyway
            get_logger().warning(f"could not release the lease {key} ({exc}); it expires within {held.lease_s:.0f} s")

    return stop


def live(catalog: Catalog, keys: Iterable[str]) -> set[str]:
    """Those of *keys* whose lease has not expired (the database's clock)."""
    keys = list(keys)
    if not keys:
        return set()
    with _database(catalog, "read the live leases") as connection:
        now = database_now(connection)
        rows = connection.execute(select(RunClaim.run_key, RunClaim.expires_at).where(RunClaim.run_key.in_(keys)))
        return {key for key, expires in rows if _utc(expires) > now}


@contextmanager
def holding(catalog: Catalog, run_key: str, *, holder: str, lease_s: float | None = None,
            poll_s: float | None = None, wait_s: float | None = None,
            on_wait: Callable[[str], None] | None = None) -> Iterator[Claim]:
    """Hold the claim on *run_key* for the block: wait while another run holds it (at most *wait_s*, default
    ``MODELFACTORY_CLAIM_WAIT_S``, then :class:`ClaimError`), heartbeat, release. The block checks
    :meth:`Claim.check` before writes that must not happen once the claim was lost.

    *on_wait* gets a progress line when the wait starts and every :data:`WAIT_NOTE_EVERY_S` seconds.
    """
    settings = get_settings()
    lease_s = lease_s or settings.claim_lease_s
    poll_s = poll_s or settings.claim_poll_s
    wait_s = wait_s or settings.claim_wait_s
    started = time.monotonic()
    noted: float | None = None
    while (held := claim(catalog, run_key=run_key, holder=holder, lease_s=lease_s)) is None:
        now = time.monotonic()
        if now - started >= wait_s:
            state = current(catalog, run_key)
            who = (f" ({state.holder}, claimed {(state.read_at - state.claimed_at).total_seconds():.0f} s ago)"
                   if state else "")
            raise ClaimError(
                f"waited {now - started:.0f} s (MODELFACTORY_CLAIM_WAIT_S={wait_s:g}) for the identical run holding "
                f"run key {run_key[:12]}{who}: it is still building. Let it finish and run this again (its outputs "
                "are then reused), or raise MODELFACTORY_CLAIM_WAIT_S")
        if on_wait is not None and (noted is None or now - noted >= WAIT_NOTE_EVERY_S):
            on_wait(waiting_line(run_key, current(catalog, run_key), waited_s=now - started))
            noted = now
        time.sleep(poll_s)
    beat = _Heartbeat(catalog, held)
    beat.start()
    try:
        yield held
    finally:
        beat.stop()
        try:
            release(catalog, held)
        except CatalogError as exc:  # never hide the block's own error; the lease expires anyway
            get_logger().warning(f"could not release the claim on run key {run_key[:12]} ({exc}); it expires "
                                 f"within {lease_s:.0f} s")
