"""Where the GPU steps keep their compile and autotune caches: all under ``MODELFACTORY_CACHE_DIR``.

Why: a GPU stage compiles before it measures. GPTQModel JIT-builds its CUDA kernels (Marlin:
180-250 s on a fresh host, then ~4 s), Inductor and Triton compile the CUDA-graph decode step,
and the CUDA driver JIT-compiles PTX. Each library caches its work, but by default in per-user
places (``~/.cache/gptqmodel``, ``/tmp/torchinductor_<user>``, ``~/.triton/cache``,
``~/.nv/ComputeCache``) that a container or pod loses and that a factory run cannot name. Putting
them under the factory's cache dir makes every run on a host (and every pod mounting the cache
volume) reuse them; to move or share them, move ``MODELFACTORY_CACHE_DIR``.

This is the one place that names them. :func:`modelfactory.core.devices.gpu_env` passes them to
the isolated step processes (quantize, benchmark); ``python -m modelfactory.core.caches`` prints
them as ``export`` lines for shells (``bench/gpu_env.sh``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

#: Environment variable -> folder under the cache dir. The variables are the libraries' own:
#: GPTQModel ``utils/cpp.py`` (torch.ops JIT builds: Marlin, Machete, ...) and ``utils/machete.py``
#: (downloaded CUTLASS sources); torch ``_inductor/runtime/cache_dir_utils.py`` (FX graph and
#: autotune caches) and ``utils/cpp_extension.py``; Triton's kernel cache; the CUDA driver's PTX cache.
COMPILE_CACHES: dict[str, str] = {
    "GPTQMODEL_TORCH_EXTENSIONS_DIR": "gptqmodel/torch_extensions",
    "GPTQMODEL_CACHE_DIR": "gptqmodel",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
    "CUDA_CACHE_PATH": "cuda",
}


def compile_cache_env(cache_dir: Path) -> dict[str, str]:
    """The compile-cache environment for *cache_dir* (absolute paths; nothing is created)."""
    root = Path(cache_dir).expanduser().absolute()
    return {name: str(root / sub) for name, sub in COMPILE_CACHES.items()}


def cache_sizes(cache_dir: Path) -> dict[str, int]:
    """Bytes held by each compile cache under *cache_dir* (0 where absent), by variable name.

    Nested caches (GPTQModel's torch extensions inside its cache dir) are counted in both.
    """
    sizes = {}
    for name, folder in compile_cache_env(cache_dir).items():
        path = Path(folder)
        sizes[name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    return sizes


def main() -> int:
    """Print ``export NAME=PATH`` for the factory's cache dir (``eval "$(python -m modelfactory.core.caches)"``)."""
    from modelfactory.core.settings import get_settings

    for name, value in compile_cache_env(get_settings().resolved_cache_dir).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
