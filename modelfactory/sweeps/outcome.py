"""What a sweep returns, and the pure rules the sweep flow applies to the catalog's view of it.

- :class:`SweepOutcome`: the ``sweep`` flow's result (small, frozen), its members as the catalog's
  matrix records them (:class:`~modelfactory.catalog.records.SweepMemberRow`).
- :func:`to_publish`: which members the publish mode sends out.
- :func:`decided`: the matrix as it reads once the winner and front are known (for the model card,
  written before the sweep row is closed).
- :func:`local_member_slots`: how many members run at once when there is no GPU pool.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Literal

from modelfactory.catalog.records import SweepDetail, SweepMemberRow
from modelfactory.core.records import Record
from modelfactory.core.sweep_spec import Objective, PublishMode

class SweepOutcome(Record):
    """What the ``sweep`` flow returns: the winner, the Pareto front and every member's end."""

    sweep_id: str
    status: Literal["finished"]
    objective: Objective
    publish_mode: PublishMode
    winner_label: str | None
    winner_run_id: str | None
    front: tuple[str, ...]  # labels, declaration order
    members: tuple[SweepMemberRow, ...]  # as the catalog's matrix records them once the sweep finished
    #: The shared fp16 measurement every member was compared with, and whether it was reused.
    baseline_path: str
    baseline_reused: bool

    @property
    def winner(self) -> SweepMemberRow | None:
        return next((m for m in self.members if m.run_id == self.winner_run_id), None)


def to_publish(*, mode: PublishMode, winner: str | None, passing: Sequence[str]) -> list[str]:
    """Members (run ids) to publish: the winner, every passing member (each on its own branch), or none."""
    if mode == "winner":
        return [winner] if winner is not None else []
    if mode == "all_passing":
        return list(passing)
    return []


def decided(detail: SweepDetail, *, winner_run_id: str | None, front: Sequence[str],
            statuses: Mapping[str, str]) -> SweepDetail:
    """*detail* with the winner, the front (run ids) and the members' final statuses filled in: the
    matrix the published cards carry, rendered before the runs and the sweep are closed."""
    members = tuple(dataclasses.replace(m, status=statuses.get(m.run_id, m.status), on_front=m.run_id in front,
                                        winner=m.run_id == winner_run_id) for m in detail.members)
    return dataclasses.replace(detail, status="finished", winner_run_id=winner_run_id, front=tuple(front),
                               members=members)


def local_member_slots(device: str) -> int:
    """Members quantized and benchmarked at once in the sweep's own process (no GPU pool).

    One on a GPU (they would share it: spread a sweep over GPUs with the pool). On CPU each step's
    worker process uses the cores through torch's threads, so members run side by side only where
    there are cores to spare: one per 8 cores, at least one.
    """
    if device != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // 8)
