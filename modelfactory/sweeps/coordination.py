"""How a sweep's members and the sweep decide together which members are published.

Every member runs as its own task and owns its catalog run from start to end: it builds, gates,
and, when it passed, *waits* (its run still open, its run-key claim still held) until the sweep has
seen every member and decided which ones it publishes; a chosen member then publishes inside its
claim, as a plain factory run does, and closes its run. So no member's run is ever left ``running``
by another member's failure, and nothing is published outside its claim.

- :class:`MemberRendezvous`  where passing members wait; the sweep waits there for every member
  (:meth:`~MemberRendezvous.wait_for_members`), then :meth:`~MemberRendezvous.decide`\\ s or
  :meth:`~MemberRendezvous.abort`\\ s (a waiting member then fails its run with the sweep's error).
- :func:`decide_sweep`  the decision from the catalog's matrix: the Pareto front and the objective's
  winner among the passing members, the members to publish, the matrix their model cards carry.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from modelfactory.catalog.records import SweepDetail
from modelfactory.core.errors import SweepAbortedError
from modelfactory.core.sweep_spec import Objective, PublishMode
from modelfactory.reports import sweep_matrix_markdown
from modelfactory.sweeps.outcome import decided, to_publish
from modelfactory.sweeps.selection import choose_winner, front


@dataclass(frozen=True)
class SweepDecision:
    """What the sweep decided once every member was gated."""

    winner_run_id: str | None
    winner_label: str | None
    front: tuple[str, ...]  # run ids, declaration order
    front_labels: tuple[str, ...]
    publish: frozenset[str]  # run ids
    #: The sweep's matrix as it reads once decided (for the published model cards).
    matrix_markdown: str


def decide_sweep(detail: SweepDetail, *, passing: Sequence[str], objective: Objective,
                 publish_mode: PublishMode) -> SweepDecision:
    """Decide on the catalog's view of the sweep (*detail*: the ratios and quality metrics exactly as
    recorded); *passing*: the run ids of the members that passed their gate."""
    on_front = set(front(detail.members, objective=objective, passing=passing))
    winner = choose_winner(detail.members, objective=objective, passing=passing)
    by_run = {m.run_id: m.label for m in detail.members}
    in_order = tuple(m.run_id for m in detail.members if m.run_id in on_front)  # declaration order
    statuses = {m.run_id: ("passed" if m.run_id in passing else m.status) for m in detail.members}
    chosen = to_publish(mode=publish_mode, winner=winner, passing=[m.run_id for m in detail.members
                                                                    if m.run_id in passing])
    matrix = sweep_matrix_markdown(decided(detail, winner_run_id=winner, front=in_order, statuses=statuses))
    return SweepDecision(winner_run_id=winner, winner_label=by_run[winner] if winner else None, front=in_order,
                         front_labels=tuple(by_run[r] for r in in_order), publish=frozenset(chosen),
                         matrix_markdown=matrix)


class MemberRendezvous:
    """Where the passing members of a sweep wait for its decision (thread-safe; members are threads)."""

    def __init__(self, members: int) -> None:
        self._members = members
        self._cond = threading.Condition()
        self._ended: set[int] = set()
        self._passing: dict[int, str] = {}
        self._decision: SweepDecision | None = None
        self._error: BaseException | None = None
        self._failures: dict[str, BaseException] = {}

    def passed(self, position: int, run_id: str) -> SweepDecision:
        """Member *position* (run *run_id*) passed its gate: wait for the sweep's decision and return it.
        Raises :class:`SweepAbortedError` when the sweep failed first."""
        with self._cond:
            self._passing[position] = run_id
            self._ended.add(position)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._decision is not None or self._error is not None)
            if self._decision is None:
                raise SweepAbortedError(f"the sweep failed before deciding what to publish: {self._error}; "
                                        "this member passed its gate but is not published") from self._error
            return self._decision

    def failed(self, run_id: str, error: BaseException) -> None:
        """Member run *run_id* failed with *error* (recorded on its run; kept for :meth:`publish_error`)."""
        with self._cond:
            self._failures[run_id] = error

    def publish_error(self, decision: SweepDecision) -> BaseException | None:
        """The error of the first member the sweep chose to publish that failed (the sweep fails with it)."""
        with self._cond:
            return next((self._failures[r] for r in sorted(decision.publish) if r in self._failures), None)

    def ended(self, position: int) -> None:
        """Member *position* is done without waiting (rejected, failed, or after :meth:`passed`)."""
        with self._cond:
            self._ended.add(position)
            self._cond.notify_all()

    def wait_for_members(self) -> list[str]:
        """Block until every member passed or ended; the run ids of those that passed, in member order."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._ended) >= self._members)
            return [self._passing[p] for p in sorted(self._passing)]

    def decide(self, decision: SweepDecision) -> None:
        with self._cond:
            self._decision = decision
            self._cond.notify_all()

    def abort(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
