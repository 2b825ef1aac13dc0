"""Build GPTQModel's CUDA kernels ahead of the first GPTQ load: ``modelfactory kernels prepare``.

GPTQModel JIT-compiles its CUDA kernels the first time a model loads with them (Marlin: about 3 minutes
on a fresh H100 host), and its Hopper default, Machete, first needs the CUTLASS v4.7.1 sources, which it
downloads from GitHub. A fresh GPU worker therefore pays minutes before its first GPTQ load, and an
offline one cannot use Machete at all. This builds the kernels once per cache (``MODELFACTORY_CACHE_DIR``,
where every factory step process and the plain-transformers check look: :mod:`modelfactory.core.caches`),
through GPTQModel's own public API (``gptqmodel.extension.load``), so later loads take seconds.

For an offline host, point ``cutlass_dir`` (GPTQModel's ``GPTQMODEL_CUTLASS_DIR``) at a CUTLASS v4.7.1
checkout copied there; the worker image (``infra/docker/Dockerfile``) fetches one at build time and sets
the variable. A build needs a GPU (GPTQModel checks for one), so the image cannot build at ``docker build``
time: ``infra/gpu-host/start-workers.sh`` runs this before it starts the workers, once per cache volume.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from modelfactory.core.devices import gpu_env
from modelfactory.core.log import progress
from modelfactory.core.records import Record
from modelfactory.core.settings import environment

#: What ``prepare`` builds by default: Marlin for fp16 and bf16 models (the benchmark's kernel on CUDA and the
#: verified fallback of a plain load), and Machete (GPTQModel's default on Hopper GPUs).
DEFAULT_KERNELS = ("marlin_fp16", "marlin_bf16", "machete")


class KernelBuild(Record):
    """One kernel: built (or found in the cache) or not, how long it took, and why not."""

    kernel: str
    ok: bool
    seconds: float
    error: str | None = None


def prepare_kernels(*, kernels: Sequence[str] = DEFAULT_KERNELS, cutlass_dir: Path | None = None,
                    ) -> list[KernelBuild]:
    """Build (or find cached) each of *kernels* into the factory's compile caches; never raises for a kernel that
    cannot be built (its :class:`KernelBuild` says why: no GPU, no network for CUTLASS, no toolchain)."""
    env = {k: v for k, v in gpu_env().items() if k != "GPTQMODEL_CPU_WORKERS"}
    if cutlass_dir is not None:
        env["GPTQMODEL_CUTLASS_DIR"] = str(Path(cutlass_dir).expanduser().resolve())
    builds = []
    with environment(env):
        from gptqmodel import extension  # imported with the caches set: GPTQModel reads them at import

        for kernel in kernels:
            progress(f"kernels: preparing {kernel} (a first build compiles for minutes)")
            start = time.perf_counter()
            try:
                extension.load(kernel)
            except Exception as exc:  # noqa: BLE001 - reported per kernel: offline (URLError), no GPU, no compiler, ...
                build = KernelBuild(kernel=kernel, ok=False, seconds=time.perf_counter() - start,
                                    error=f"{type(exc).__name__}: " + " ".join(str(exc).split())[:1000])
            else:
                build = KernelBuild(kernel=kernel, ok=True, seconds=time.perf_counter() - start)
            progress(f"kernels: {kernel}: " + (f"ready in {build.seconds:.1f} s" if build.ok else f"FAILED: {build.error}"))
            builds.append(build)
    return builds
