"""Which sweep configurations are worth keeping: the Pareto front and the objective's winner.

Pure functions over small records (one per configuration), so the rule is testable without a
model. Axes, all "lower is better" after orientation: quality loss against fp16 (KL divergence
mean when measured, else the perplexity increase), disk size ratio, and the negated decode
speed-up at batch 1. Only configurations that passed the gate compete.

(The catalog's ``best`` query computes a two-axis front over up to 100k stored runs in SQL; this
one ranks the few members of one sweep in memory, on all three axes.)
"""

from __future__ import annotations

from collections.abc import Sequence

from modelfactory.core.records import Record
from modelfactory.core.sweep_spec import Objective


class MemberScore(Record):
    """What selection needs of one configuration's verdict."""

    label: str
    passed: bool
    size_ratio: float | None = None
    decode_speedup: float | None = None
    kld_mean: float | None = None
    ppl_increase_pct: float | None = None

    def quality_loss(self) -> float | None:
        """KL divergence from fp16 when measured (the sharper signal), else the perplexity increase."""
        return self.kld_mean if self.kld_mean is not None else self.ppl_increase_pct

    def axes(self) -> tuple[float, float, float]:
        """(quality loss, size ratio, -speed-up); an unmeasured axis counts as the worst."""
        inf = float("inf")
        loss, size = self.quality_loss(), self.size_ratio
        return (inf if loss is None else loss, inf if size is None else size,
                inf if self.decode_speedup is None else -self.decode_speedup)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def pareto_front(scores: Sequence[MemberScore]) -> list[str]:
    """Labels of the passing configurations no other passing one beats on every axis, in input order."""
    passing = [s for s in scores if s.passed]
    return [s.label for s in passing if not any(_dominates(o.axes(), s.axes()) for o in passing if o is not s)]


def choose_winner(scores: Sequence[MemberScore], *, objective: Objective) -> str | None:
    """The passing configuration the objective prefers (``None`` when none passed).

    smallest: lowest size ratio; fastest: highest decode speed-up; closest: lowest quality loss.
    Ties (and unmeasured objectives) fall back to the other axes in (loss, size, speed) order, then
    declaration order, so the choice is deterministic.
    """
    passing = [s for s in scores if s.passed]
    if not passing:
        return None
    primary = {"closest": 0, "smallest": 1, "fastest": 2}[objective]

    def key(item: tuple[int, MemberScore]) -> tuple[float, ...]:
        index, score = item
        axes = score.axes()
        return (axes[primary], *(axes[i] for i in range(3) if i != primary), index)

    return min(enumerate(passing), key=key)[1].label
