"""Run-key claims in the catalog (the lock that holds across hosts), on SQLite and PostgreSQL.

"Hosts" are separate processes with their own MODELFACTORY_HOME sharing only the catalog
database. The factory-level test (two hosts, one builds, the other waits and reuses through the
stage store) is in ``tests/test_stage_handoff.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from modelfactory.catalog import Catalog, claims, open_catalog
from modelfactory.testing.catalog import postgres_schema_url
from modelfactory.testing.env import REPO


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        cat = open_catalog(f"sqlite:///{tmp_path / 'shared' / 'catalog.db'}")
        yield cat
        cat.dispose()
    else:
        with postgres_schema_url() as url:
            cat = open_catalog(url)
            yield cat
            cat.dispose()


def url_of(catalog: Catalog) -> str:
    return catalog.engine.url.render_as_string(hide_password=False)


def test_a_claim_is_exclusive_until_released(catalog):
    first = claims.claim(catalog, run_key="k", holder="host-a", lease_s=600)
    assert first is not None and first.holder == "host-a"
    assert claims.claim(catalog, run_key="k", holder="host-b", lease_s=600) is None
    assert claims.claim(catalog, run_key="other", holder="host-b", lease_s=600) is not None  # keys are independent
    state = claims.current(catalog, "k")
    assert state.holder == "host-a" and state.expires_at > state.claimed_at
    assert claims.renew(catalog, first)
    claims.release(catalog, first)
    assert claims.current(catalog, "k") is None
    assert claims.claim(catalog, run_key="k", holder="host-b", lease_s=600) is not None


def test_an_expired_claim_is_taken_over_and_the_old_holder_cannot_touch_it(catalog):
    old = claims.claim(catalog, run_key="k", holder="host-a", lease_s=0.001)
    assert old is not None
    new = wait_for_claim(catalog, "k", "host-b")
    assert new.token != old.token and claims.current(catalog, "k").holder == "host-b"
    assert not claims.renew(catalog, old)  # the old holder learns it lost the claim
    claims.release(catalog, old)  # and its release leaves the new claim alone
    assert claims.current(catalog, "k").holder == "host-b"


def wait_for_claim(catalog: Catalog, key: str, holder: str) -> claims.Claim:
    for _ in range(1000):
        got = claims.claim(catalog, run_key=key, holder=holder, lease_s=600)
        if got is not None:
            return got
        threading.Event().wait(0.01)
    raise AssertionError("the expired claim was never taken over")


def test_simultaneous_claims_have_exactly_one_winner(catalog):
    barrier = threading.Barrier(6)
    won: list[str] = []

    def contender(i: int) -> None:
        barrier.wait()
        if claims.claim(catalog, run_key="race", holder=f"h{i}", lease_s=600) is not None:
            won.append(f"h{i}")

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 1 and claims.current(catalog, "race").holder == won[0]


def test_holding_waits_with_progress_lines_then_takes_the_key(catalog):
    order: list[str] = []
    lines: list[str] = []
    waiting = threading.Event()

    def second() -> None:
        def on_wait(line: str) -> None:
            lines.append(line)
            waiting.set()

        with claims.holding(catalog, "k", holder="host-b pid 2 run r2", poll_s=0.05, on_wait=on_wait):
            order.append("second")

    with claims.holding(catalog, "k", holder="host-a pid 1 run r1", lease_s=600):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(30), "the second run did not wait"
        order.append("first")
    thread.join(30)
    assert order == ["first", "second"]
    assert "an identical run (key k) is in progress on host-a pid 1 run r1" in lines[0]
    assert "waiting for it to finish" in lines[0]
    assert claims.current(catalog, "k") is None  # released on exit


HOLDER = textwrap.dedent("""
    import sys, time
    from modelfactory.catalog import open_catalog, claims
    catalog = open_catalog(sys.argv[1])
    with claims.holding(catalog, "shared-key", holder=claims.holder_name("r-killed")):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_killed_holder_on_another_host_loses_its_claim_after_the_lease(catalog, tmp_path):
    lease_s = 3.0
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODELFACTORY_HOME": str(tmp_path / "host-a"),
           "MODELFACTORY_CLAIM_LEASE_S": str(lease_s)}
    env.pop("MODELFACTORY_WORK_DIR", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url_of(catalog)], env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # Alive, it renews its lease: after more than two leases the key is still its own.
        threading.Event().wait(2.5 * lease_s)
        assert claims.claim(catalog, run_key="shared-key", holder="host-b", lease_s=600) is None
        assert f"pid {holder.pid} run r-killed" in claims.current(catalog, "shared-key").holder
        holder.kill()  # the host dies: no release, no more heartbeats
        holder.wait(30)
        lines: list[str] = []
        with claims.holding(catalog, "shared-key", holder="host-b", poll_s=0.2, on_wait=lines.append) as held:
            assert claims.current(catalog, "shared-key").holder == "host-b" == held.holder
        assert lines and "r-killed" in lines[0] and "expires" in lines[0]
    finally:
        holder.kill()
        holder.wait(30)


# --------------------------------------------------------------------------- issue 24.6


def test_a_host_whose_clock_runs_ahead_cannot_take_a_live_claim(catalog, monkeypatch):
    """Lease times are the database's clock: a host two hours ahead (bad NTP) used to see every live claim as
    expired and take it over."""
    from datetime import UTC, datetime, timedelta

    held = claims.claim(catalog, run_key="clock", holder="host-a", lease_s=600)
    assert held is not None

    class AheadClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz or UTC) + timedelta(hours=2)

    monkeypatch.setattr(claims, "datetime", AheadClock, raising=False)  # host b's clock
    assert claims.claim(catalog, run_key="clock", holder="host-b", lease_s=600) is None
    assert claims.current(catalog, "clock").holder == "host-a"


def test_a_run_that_lost_its_claim_stops_at_its_next_record(catalog):
    """A lost lease only logged a warning and the holder kept writing. Now the heartbeat marks the claim lost
    and the run's next record (or its publication) raises ClaimError."""
    from modelfactory.core.errors import ClaimError
    from modelfactory.tasks.record import RunRecorder

    catalog.start_run(run_id="r-lost", name="lost", spec={}, run_key="lost-key")
    recorder = RunRecorder(catalog, "r-lost")
    with claims.holding(catalog, "lost-key", holder="host-a run r-lost", lease_s=1.5) as held:
        recorder.hold(held)
        recorder.step("download", duration_s=0.1)
        # The lease expires (a stalled process) and another run takes the key.
        with catalog.engine.begin() as connection:
            connection.execute(text("UPDATE run_claims SET expires_at = claimed_at WHERE run_key = 'lost-key'"))
        taken = wait_for_claim(catalog, "lost-key", "host-b run r-new")
        assert held.lost.wait(30), "the heartbeat never noticed the claim was taken"
        with pytest.raises(ClaimError, match="was lost: its lease .* another run took the key"):
            recorder.step("merge", duration_s=0.1)
        with pytest.raises(ClaimError):
            recorder.check_claim()  # what the flows call before publishing
    assert [s.name for s in catalog.get_run("r-lost").steps] == ["download"]
    assert claims.current(catalog, "lost-key").holder == "host-b run r-new" and taken is not None


def test_a_waiter_gives_up_after_the_claim_wait_with_a_clear_error(catalog):
    """Waiters had no timeout: a stuck holder made every identical run wait forever."""
    from modelfactory.core.errors import ClaimError

    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with claims.holding(catalog, "stuck", holder="host-b", poll_s=0.05, wait_s=0.5):
                pass
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    held = claims.claim(catalog, run_key="stuck", holder="host-a pid 1 run r-stuck", lease_s=600)
    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the waiter is still waiting"
    (error,) = errors
    assert isinstance(error, ClaimError)
    assert "MODELFACTORY_CLAIM_WAIT_S" in error.message and "host-a pid 1 run r-stuck" in error.message
    claims.release(catalog, held)
