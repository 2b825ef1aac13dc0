"""Devices for the GPU steps: device and dtype choice, worker environment, memory cap, heartbeat, the
out-of-memory error (no model objects)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from modelfactory.core.caches import compile_cache_env
from modelfactory.core.errors import OutOfMemoryError
from modelfactory.core.log import progress
from modelfactory.core.settings import get_settings


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from modelfactory.core.errors import SpecError

        raise SpecError("device 'cuda' was requested but no CUDA GPU is visible: use device 'auto' or 'cpu'")
    return requested


#: CPU features (keys of ``torch.cpu.get_capabilities()``) that compute bfloat16 natively: x86's
#: AVX512-BF16 and AMX-BF16, Arm's BF16 and SVE-BF16. Without them torch emulates bf16. Measured on an
#: AVX2-only AMD EPYC, one thread: a 512x576 @ 576x1536 matmul ran 6.3 GFLOP/s in bf16 vs 39.8 in fp32,
#: and a 512-token forward of GPTQ SmolLM2-135M took 75 s in bf16 vs 3.3-5.5 s in fp32.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
CpuDtype = Literal["bfloat16", "float32"]


def cpu_dtype(features: Mapping[str, object], *, setting: Literal["auto", "bfloat16", "float32"] = "auto",
              ) -> CpuDtype:
    """The compute dtype of ``auto`` on a CPU with these *features*: bfloat16 where it is native (it
    halves memory; fp16 matmuls are ~9x slower than bf16 there), else float32. *setting*
    (``MODELFACTORY_CPU_DTYPE``) other than ``auto`` wins."""
    if setting == "bfloat16" or setting == "float32":
        return setting
    return "bfloat16" if any(features.get(name) for name in NATIVE_BF16_FEATURES) else "float32"


def cpu_features() -> Mapping[str, object]:
    """This CPU's features as torch sees them (``torch.cpu.get_capabilities``; older torch: the two x86
    checks it has)."""
    import torch

    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities()
    return {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_bf16": torch.cpu._is_amx_tile_supported()}


def gpu_total_bytes(device: str) -> int | None:
    """The memory of this process's GPU (None on a CPU), read without allocating on it."""
    if device == "cpu":
        return None
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def resolve_dtype(requested: str, device: str) -> str:
    """``auto``: float16 on CUDA; on a CPU, :func:`cpu_dtype` (bfloat16 where native, else float32)."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "float16"
    return cpu_dtype(cpu_features(), setting=get_settings().cpu_dtype)


def gpu_env() -> dict[str, str]:
    """Environment for GPTQModel/torch workers: CPU worker count and the compile caches, all under
    the factory's cache dir (:mod:`modelfactory.core.caches`), so every run on a host reuses them."""
    settings = get_settings()
    return {"GPTQMODEL_CPU_WORKERS": str(settings.cpu_workers), **compile_cache_env(settings.resolved_cache_dir)}


@contextmanager
def heartbeat(label: str, every_s: float = 15.0) -> Iterator[None]:
    """Print a progress line every *every_s* seconds while a long library call runs."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            progress(f"{label}: still running ({time.perf_counter() - start:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


def out_of_memory_error(step: str, *, model_path: str, device: str, exc: BaseException,
                        advice: str) -> OutOfMemoryError:
    """An :class:`~modelfactory.core.errors.OutOfMemoryError` naming the step, model size, device memory and
    what to do, for the caller to raise.

    Not transient: the same inputs on the same device would run out of memory again.
    """
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    memory = "device memory unknown"
    if device.startswith("cuda"):
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
            memory = f"GPU {torch.cuda.get_device_name()} with {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free now)"
            if fraction := get_settings().cuda_memory_fraction:
                memory += f", this step capped at {fraction * total / 2**30:.2f} GiB by MODELFACTORY_CUDA_MEMORY_FRACTION"
        except Exception:  # noqa: BLE001 - the message is best effort, the error is what matters
            pass
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutOfMemoryError(
        f"the {step} step ran out of memory on {device} for {model_path} ({weights / 1e9:.2f} GB of weights; "
        f"{memory}): {advice}. ({first_line})"
    )


def apply_memory_cap(device: str) -> None:
    """Apply ``MODELFACTORY_CUDA_MEMORY_FRACTION`` to this process's CUDA allocator (no-op on CPU)."""
    fraction = get_settings().cuda_memory_fraction
    if fraction is None or not device.startswith("cuda"):
        return
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction)
    total = torch.cuda.get_device_properties(0).total_memory
    progress(f"GPU memory capped at {fraction:g} of {total / 2**30:.1f} GiB = {fraction * total / 2**30:.2f} GiB "
             f"(MODELFACTORY_CUDA_MEMORY_FRACTION)")
