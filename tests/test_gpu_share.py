"""Sweep members sharing one GPU: how many fit (measured memory), and timed phases alone on it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from modelfactory.core.gpu_share import gpu_turn, members_per_gpu
from modelfactory.core.records import BaselineResult, SideMetrics
from modelfactory.sweeps.outcome import local_member_slots

GB = 10**9


@pytest.mark.parametrize(("gpu", "peak", "most", "expected"), [
    (80 * GB, 28 * GB, 4, 2),  # a 7B member (fp16 next to 4-bit at its peak) on an H100: two
    (141 * GB, 28 * GB, 8, 4),  # on an H200: four
    (80 * GB, 28 * GB, 1, 1),  # the setting caps it
    (24 * GB, 28 * GB, 4, 1),  # does not fit twice (or even once): one, never zero
    (80 * GB, 0, 4, 1),  # no measurement: one
])
def test_members_per_gpu_from_measured_memory(gpu, peak, most, expected):
    assert members_per_gpu(gpu_bytes=gpu, member_peak_bytes=peak, max_members=most) == expected


def _baseline(kind: str, *, peak: int, loaded: int) -> BaselineResult:
    metrics = SideMetrics.model_construct(memory_kind=kind, mem_peak_bytes=peak, mem_after_load_bytes=loaded)
    return BaselineResult.model_construct(model_sha="x", metrics=metrics, key="k", path="p")


def test_a_sweep_on_one_gpu_takes_members_by_the_fp16_sides_measured_memory(monkeypatch):
    monkeypatch.setattr("modelfactory.sweeps.outcome.gpu_total_bytes", lambda device: 80 * GB)
    seven_b = _baseline("cuda_allocated", peak=15 * GB, loaded=13 * GB)
    assert local_member_slots("cuda", baseline=seven_b) == 2  # the default gpu_members_max
    assert local_member_slots("cuda", baseline=_baseline("cuda_allocated", peak=40 * GB, loaded=35 * GB)) == 1
    assert local_member_slots("cuda", baseline=None) == 1


def _hold(events: list, name: str, *, exclusive: bool, device_id: str, hold_s: float, started: threading.Event):
    with gpu_turn("cuda", exclusive=exclusive, what=name, device_id=device_id):
        started.set()
        events.append((name, "in", time.monotonic()))
        time.sleep(hold_s)
        events.append((name, "out", time.monotonic()))


def _spawn(*args, **kwargs) -> tuple[threading.Thread, threading.Event]:
    started = threading.Event()
    thread = threading.Thread(target=_hold, args=args, kwargs={**kwargs, "started": started})
    thread.start()
    return thread, started


def test_a_timed_phase_has_the_gpu_alone_and_is_not_starved():
    """Two shared phases overlap; the timer waits for them; a shared phase asked for while the timer waits
    starts only after the timing (each turn is its own open file: as two processes would hold them)."""
    gpu, events = f"test-{uuid.uuid4().hex[:8]}", []
    a, a_in = _spawn(events, "quantize-a", exclusive=False, device_id=gpu, hold_s=0.6)
    a_in.wait()
    b, b_in = _spawn(events, "quantize-b", exclusive=False, device_id=gpu, hold_s=0.3)
    b_in.wait()  # shared phases overlap
    timer, _ = _spawn(events, "decode-timing", exclusive=True, device_id=gpu, hold_s=0.4)
    time.sleep(0.15)  # the timer is waiting now
    late, _ = _spawn(events, "quality-c", exclusive=False, device_id=gpu, hold_s=0.1)
    for thread in (a, b, timer, late):
        thread.join(timeout=10)
    at = {(name, what): t for name, what, t in events}
    assert at[("quantize-b", "in")] < at[("quantize-a", "out")]
    assert at[("decode-timing", "in")] >= max(at[("quantize-a", "out")], at[("quantize-b", "out")])
    assert at[("quality-c", "in")] >= at[("decode-timing", "out")]  # not let in ahead of the waiting timer


def test_a_cpu_step_takes_no_turn():
    with gpu_turn("cpu", exclusive=True, what="x"), gpu_turn("cpu", exclusive=True, what="y"):
        pass
