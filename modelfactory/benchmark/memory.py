"""Memory and disk footprint of one side.

On CUDA: the caching allocator's allocated bytes after load and its peak while decoding / overall.
On CPU: the process RSS delta over the pre-load RSS, and the peak RSS (VmHWM, reset via
``/proc/self/clear_refs`` before each phase). Each side runs in its own process, so nothing of the
other side is counted. Disk: bytes of the ``*.safetensors`` files.
"""

from __future__ import annotations

from pathlib import Path

from modelfactory.core.records import MemoryKind


def disk_bytes(folder: Path) -> int:
    """Bytes of the weights in *folder* (``*.safetensors`` only: config and tokenizer not counted)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class MemoryProbe:
    """Allocated CUDA bytes, or process RSS bytes on CPU, relative to a baseline taken at creation."""

    def __init__(self, *, device: str) -> None:
        import torch

        self._torch = torch
        self.kind: MemoryKind = "cuda_allocated" if device == "cuda" else "rss"
        self.baseline = self.current_absolute()

    def current_absolute(self) -> int:
        if self.kind == "cuda_allocated":
            self._torch.cuda.synchronize()
            return self._torch.cuda.memory_allocated()
        return _status_kb("VmRSS") * 1024

    def current(self) -> int:
        return self.current_absolute() - self.baseline

    def reset_peak(self) -> None:
        if self.kind == "cuda_allocated":
            self._torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass  # not permitted (some sandboxes): the peak then covers the whole process life

    def peak(self) -> int:
        if self.kind == "cuda_allocated":
            self._torch.cuda.synchronize()
            return self._torch.cuda.max_memory_allocated() - self.baseline
        return _status_kb("VmHWM") * 1024 - self.baseline


#: Head-room kept free when a second model is loaded next to the measured one (activations, logits of a
#: window, allocator slack), as a share of that model's weight bytes.
HEADROOM = 0.25


def fits_next_to(model_dir: Path, *, device: str, dtype) -> tuple[bool, str]:
    """Whether the model in *model_dir*, loaded in *dtype*, fits in the free memory of *device* next to what
    is loaded already: ``(fits, why)`` (the bytes needed and free, for the record)."""
    import psutil
    import torch

    stored = disk_bytes(Path(model_dir))
    try:  # the stored weights are 16-bit for the fp16 side; float32 on a CPU without native bf16 doubles them
        needed = int(stored / 2 * torch.empty((), dtype=dtype).element_size() * (1 + HEADROOM))
    except TypeError:
        needed = int(stored * (1 + HEADROOM))
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = psutil.virtual_memory().available
    gib = 1024 ** 3
    return needed <= free, f"{needed / gib:.1f} GiB needed, {free / gib:.1f} GiB free on {device}"
