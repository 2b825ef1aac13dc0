"""The one benchmark harness both sides (fp16 baseline and GPTQ) go through.

The same code, tokens and settings for both sides, each side in a fresh process:

- :mod:`~modelfactory.benchmark.perplexity`: sliding-window perplexity over one token sequence,
  the digest proving both sides scored the same tokens, and a hook seeing every window's logits.
- :mod:`~modelfactory.benchmark.decode`: greedy decode at each batch size (the prompt repeated)
  timed without its prefill; eager HF ``generate`` on CPU, and the eager reference every CUDA
  graph is checked against.
- :mod:`~modelfactory.benchmark.graph`: on CUDA (mode ``auto``) the decode step runs as a
  hand-captured CUDA graph over a static KV cache of the batch, prepared by a treatment and
  checked first.
- :mod:`~modelfactory.benchmark.fusion`: q/k/v and gate/up fused into one GEMM each (a treatment).
- :mod:`~modelfactory.benchmark.kernels`: the GPTQ kernel and decode mode a side runs with, and
  GPTQ kernels as opaque ops for ``torch.compile``.
- :mod:`~modelfactory.benchmark.memory`: memory after load and at peak, and disk bytes.

Everything imports torch lazily except :mod:`~modelfactory.benchmark.fusion` (its modules are
``torch.nn.Module`` classes), so its names are loaded here on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelfactory.benchmark.decode import (
    batch_prompt,
    decode_rate,
    measure_decode,
    reference_decode,
)
from modelfactory.benchmark.graph import (
    GRAPH_TREATMENTS,
    DecodeCheck,
    GraphDecoder,
    GraphTreatment,
    Treatment,
    measure_decode_graph,
)
from modelfactory.benchmark.kernels import (
    DecodeMode,
    choose_decode_mode,
    choose_kernel,
    quantized_kernel_name,
)
from modelfactory.benchmark.memory import MemoryProbe, disk_bytes
from modelfactory.benchmark.perplexity import (
    WindowHook,
    check_same_tokens,
    measure_perplexity,
    perplexity_windows,
    token_digest,
)

if TYPE_CHECKING:
    from modelfactory.benchmark.fusion import fuse_projections

__all__ = [
    "GRAPH_TREATMENTS",
    "DecodeCheck",
    "DecodeMode",
    "GraphDecoder",
    "GraphTreatment",
    "MemoryProbe",
    "Treatment",
    "WindowHook",
    "batch_prompt",
    "check_same_tokens",
    "choose_decode_mode",
    "choose_kernel",
    "decode_rate",
    "disk_bytes",
    "fuse_projections",
    "measure_decode",
    "measure_decode_graph",
    "measure_perplexity",
    "perplexity_windows",
    "quantized_kernel_name",
    "reference_decode",
    "token_digest",
]


def __getattr__(name: str):
    if name == "fuse_projections":
        from modelfactory.benchmark.fusion import fuse_projections

        return fuse_projections
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
