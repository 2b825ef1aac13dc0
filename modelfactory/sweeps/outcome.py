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
from modelfactory.core.devices import gpu_total_bytes
from modelfactory.core.gpu_share import members_per_gpu
from modelfactory.core.records import BaselineResult, Record
from modelfactory.core.settings import get_settings
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


def local_member_slots(device: str, *, baseline: BaselineResult | None = None) -> int:
    """Members quantized and benchmarked at once in the sweep's own process (no GPU pool).

    On a GPU: as many as its memory takes at the measured memory of a member
    (:func:`~modelfactory.core.gpu_share.members_per_gpu`), at most the ``gpu_members_max`` setting. A member's largest phase
    is its GPTQ side's exact KL, which holds the fp16 model next to the 4-bit one: at most the fp16 side's
    measured peak (*baseline*) plus its weights' memory after load. Timed phases still take the GPU alone
    (:func:`~modelfactory.core.gpu_share.gpu_turn`). Without a measurement: one.

    On CPU each step's worker process uses the cores through torch's threads, so members run side by side
    only where there are cores to spare: one per 8 cores, at least one.
    """
    if device == "cpu":
        return max(1, (os.cpu_count() or 1) // 8)
    if baseline is None or baseline.metrics.memory_kind != "cuda_allocated":
        return 1
    member_peak = baseline.metrics.mem_peak_bytes + baseline.metrics.mem_after_load_bytes
    return members_per_gpu(gpu_bytes=gpu_total_bytes(device) or 0, member_peak_bytes=member_peak,
                           max_members=get_settings().gpu_members_max)
