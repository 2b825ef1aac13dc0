"""Sweeps: many quantization configurations of one merged model, one winner.

- :func:`~modelfactory.sweeps.selection.front` / :func:`~modelfactory.sweeps.selection.choose_winner`:
  the Pareto front of the passing configurations and the one the objective picks (``catalog best``'s
  definition: :func:`modelfactory.catalog.queries.pareto_front`).
- :mod:`~modelfactory.sweeps.coordination`: members wait, gated, for the sweep's decision
  (:class:`~modelfactory.sweeps.coordination.MemberRendezvous`, :func:`~modelfactory.sweeps.coordination.decide_sweep`);
  each chosen member publishes inside its own run-key claim.
The spec is :class:`modelfactory.core.sweep_spec.SweepSpec`; the wiring is ``flows/sweep.py``.
"""

from modelfactory.sweeps.selection import choose_winner, front

__all__ = ["choose_winner", "front"]
