"""Which sweep configurations are worth keeping: the Pareto front and the objective's winner.

One definition for a sweep and ``catalog best``: among the members that passed their gate and
measured both, the Pareto front on (perplexity increase, the objective's metric)
(:func:`modelfactory.catalog.queries.pareto_front`); the winner is the front's point with the best
objective (ties: lower perplexity increase, then the newest run). So ``catalog best --by <objective>``
over the same runs names the sweep's winner (tested).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from modelfactory.catalog.queries import FrontPoint, pareto_front
from modelfactory.catalog.records import SweepMemberRow
from modelfactory.core.sweep_spec import OBJECTIVE_METRICS, Objective


def front(members: Sequence[SweepMemberRow], *, objective: Objective, passing: Collection[str]) -> list[str]:
    """Run ids of the Pareto front among the *passing* members (run ids), best objective last."""
    metric, higher_better = OBJECTIVE_METRICS[objective]
    points = [FrontPoint(id=m.run_id, ppl=m.ppl_increase_pct, objective=getattr(m, metric), started_at=m.started_at)
              for m in members if m.run_id in passing and m.ppl_increase_pct is not None
              and getattr(m, metric) is not None and m.started_at is not None]
    return pareto_front(points, higher_better=higher_better)


def choose_winner(members: Sequence[SweepMemberRow], *, objective: Objective, passing: Collection[str]) -> str | None:
    """The run id of the passing member the objective prefers: the front's last point (``None``: none qualifies)."""
    on_front = front(members, objective=objective, passing=passing)
    return on_front[-1] if on_front else None
