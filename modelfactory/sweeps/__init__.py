"""Sweeps: many quantization configurations of one merged model, one winner.

- :func:`~modelfactory.sweeps.selection.pareto_front` / :func:`~modelfactory.sweeps.selection.choose_winner`:
  which passing configurations are not beaten on every axis, and which one the objective picks.
- :mod:`~modelfactory.sweeps.coordination`: members wait, gated, for the sweep's decision
  (:class:`~modelfactory.sweeps.coordination.MemberRendezvous`, :func:`~modelfactory.sweeps.coordination.decide_sweep`);
  each chosen member publishes inside its own run-key claim.
The spec is :class:`modelfactory.core.sweep_spec.SweepSpec`; the wiring is ``flows/sweep.py``.
"""

from modelfactory.sweeps.selection import MemberScore, choose_winner, pareto_front

__all__ = ["MemberScore", "choose_winner", "pareto_front"]
