"""Sharing one GPU between the steps of several sweep members, without disturbing a timing.

Members of a sweep on one GPU overlap (issue 26): one member's quantize runs while another's benchmark
measures quality, and a member's CPU work (the CPU runnability check, saving, hashing, uploads) runs
while another uses the GPU. How many members a GPU takes comes from measured memory
(:func:`members_per_gpu`). A *timed* phase (the decode speed of a benchmark side) must see the GPU alone,
so GPU work takes turns on this host:

- :func:`gpu_turn` ``exclusive=False`` (quantize, quality measures, the CUDA runnability check): any
  number at once;
- :func:`gpu_turn` ``exclusive=True`` (decode timing): alone; it waits for the shared holders to finish
  their phase, and while it waits no new shared phase starts (no starvation of the timer).

The turns are advisory ``flock`` locks on two files per GPU (by UUID) in this host's temporary folder,
so they hold across the processes of one host (the sweep's own process, or several flow runs of one
GPU worker) and vanish with a crashed holder. Written here with the standard library's ``flock`` because
Prefect's concurrency limits count slots (no shared/exclusive kinds) and torch has no such lock;
``filelock.ReadWriteLock`` (3.21+, SQLite-based) could replace the two files where every host has it (the GPU
image's filelock was not checked).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelfactory.core.log import progress

#: Share of a GPU's memory the members of one sweep may plan to use together (the rest: CUDA contexts,
#: allocator slack, the kernels' workspaces).
PLANNED_MEMORY_SHARE = 0.85


def members_per_gpu(*, gpu_bytes: int, member_peak_bytes: int, max_members: int) -> int:
    """How many sweep members one GPU of *gpu_bytes* takes at once: as many as fit
    :data:`PLANNED_MEMORY_SHARE` of it at *member_peak_bytes* each (the measured peak of the largest
    phase of a member), at least 1, at most *max_members*."""
    if member_peak_bytes <= 0 or gpu_bytes <= 0:
        return 1
    return max(1, min(max_members, int(gpu_bytes * PLANNED_MEMORY_SHARE // member_peak_bytes)))


def _lock_paths(device_id: str) -> tuple[Path, Path]:
    root = Path(tempfile.gettempdir())
    return root / f"modelfactory-gpu-{device_id}.turnstile", root / f"modelfactory-gpu-{device_id}.lock"


def current_gpu_id() -> str:
    """This process's GPU on this host: the first entry of ``CUDA_VISIBLE_DEVICES`` (an index or a
    ``GPU-...`` UUID: a GPU worker's pin), else ``0`` (the device an unpinned process uses). Read from the
    environment, so a parent process asks without starting CUDA."""
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"


@contextmanager
def gpu_turn(device: str, *, exclusive: bool, what: str, device_id: str | None = None) -> Iterator[None]:
    """Hold a shared or exclusive turn on this host's GPU (module docstring) while the block runs.
    No-op on a CPU. *device_id*: the GPU's id (default :func:`current_gpu_id`)."""
    if device == "cpu":
        yield
        return
    turnstile_path, lock_path = _lock_paths(device_id or current_gpu_id())
    start = time.perf_counter()
    with open(turnstile_path, "a") as turnstile, open(lock_path, "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # a waiting timer holds it: no new shared turn starts meanwhile
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        waited = time.perf_counter() - start
        if waited >= 1.0:
            progress(f"{what}: waited {waited:.0f} s for {'the GPU to itself' if exclusive else 'a turn on the GPU'} "
                     "(another sweep member was using it)")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
