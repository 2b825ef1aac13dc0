"""Which GPTQ kernel and decode mode a side runs with, and GPTQ kernels as opaque ops for torch.compile."""

from __future__ import annotations

from typing import Literal

from modelfactory.core.errors import SpecError

#: What ``benchmark.decode.mode`` may ask for (``auto``: chosen by device, :func:`choose_decode_mode`).
RequestedDecodeMode = Literal["auto", "eager", "cuda_graph"]
#: How a side's decode is timed: HF ``generate``, or a CUDA graph of the decode step.
DecodeMode = Literal["eager", "cuda_graph"]


def choose_kernel(requested: str, *, device: str, group_size: int, in_features: list[int]) -> str:
    """The GPTQModel backend to load with (an explicit request is kept as is).

    ``auto`` on CUDA is Marlin when every layer width is a multiple of 128 (Marlin's tile), else
    Triton. GPTQModel's own ``auto`` picks Machete on Hopper, which downloads CUTLASS on first
    use and so fails on offline GPU hosts; Marlin was the fastest kernel measured on an H100
    (docs/benchmarks.md). On CPU, ``auto`` lets GPTQModel pick, except when a layer width is not a
    multiple of the group size: its default CPU kernel (ATen int4pack) rejects that (SmolLM2's
    576-wide layers with group 128), so the portable ``gptq_torch`` kernel is used instead.
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "gptq_marlin" if all(k % 128 == 0 for k in in_features) else "gptq_triton"
    if group_size > 0 and any(k % group_size for k in in_features):
        return "gptq_torch"
    return "auto"


def choose_decode_mode(requested: RequestedDecodeMode, *, device: str) -> DecodeMode:
    """``auto``: CUDA-graph decode on CUDA (see :mod:`modelfactory.benchmark.graph`), HF generate on CPU."""
    if requested == "auto":
        return "cuda_graph" if device == "cuda" else "eager"
    if requested == "cuda_graph" and device != "cuda":
        raise SpecError("benchmark.decode.mode 'cuda_graph' needs a CUDA device: use 'auto' or 'eager' on CPU")
    return requested


def is_gptq_linear(module) -> bool:
    """A GPTQModel quantized linear (any kernel): matched by base-class name, so that checking
    costs no GPTQModel import."""
    return any(cls.__name__ == "BaseQuantLinear" for cls in type(module).__mro__)


def quantized_kernel_name(model) -> str:
    """Class name of the first GPTQ linear layer (e.g. ``TorchAtenLinear``), or ``dense``."""
    for module in model.modules():
        if is_gptq_linear(module):
            return type(module).__name__
    return "dense"


# --------------------------------------------------------------------------- opaque custom op
_OPAQUE_MODULES: list = []  # quantized linears reached through torch.ops.modelfactory.opaque_linear


def _opaque_op():
    """``torch.ops.modelfactory.opaque_linear(x, index)``: runs ``_OPAQUE_MODULES[index]`` eagerly.

    torch.compile cannot trace GPTQModel's kernels (Python-side dispatch, no fake tensors); as a
    custom op with a shape-only fake implementation the kernel is one opaque node in the
    compiled graph and still launches (and is captured in the CUDA graph) as itself.
    """
    import torch

    if not hasattr(torch.ops.modelfactory, "opaque_linear"):
        @torch.library.custom_op("modelfactory::opaque_linear", mutates_args=(),
                                 schema="(Tensor x, int index) -> Tensor")
        def opaque_linear(x: torch.Tensor, index: int) -> torch.Tensor:
            return _OPAQUE_MODULES[index]._mf_eager_forward(x)

        @opaque_linear.register_fake
        def _(x, index):
            return x.new_empty((*x.shape[:-1], _OPAQUE_MODULES[index].out_features))

    return torch.ops.modelfactory.opaque_linear


def _wants_opaque(module) -> bool:
    """GPTQ linears, and modules that mark themselves (``_mf_opaque``: the fused Marlin GEMM)."""
    return is_gptq_linear(module) or getattr(module, "_mf_opaque", False)


def make_quant_linears_opaque(model) -> int:
    """Route every quantized linear of *model* through the opaque custom op (idempotent)."""
    op = _opaque_op()
    count = 0
    for module in model.modules():
        if _wants_opaque(module) and not hasattr(module, "_mf_eager_forward"):
            module._mf_eager_forward = module.forward
            index = len(_OPAQUE_MODULES)
            _OPAQUE_MODULES.append(module)
            module._mf_opaque_index = index
            module.forward = lambda x, _i=index: op(x, _i)
            count += 1
    return count


def release_opaque(module) -> None:
    """Drop *module* from the opaque-op registry, so that it does not stay alive through it
    (fusion replaces the separate modules by one)."""
    index = getattr(module, "_mf_opaque_index", None)
    if index is not None:
        _OPAQUE_MODULES[index] = None
