"""Projections that read the same input fused into one GEMM (q/k/v, gate/up); model code untouched.

At batch 1 a decode step is bound by weight reads and kernel launches, so one GEMM over the
concatenated weights beats three (q/k/v) or two (gate/up). transformers' modules keep their own
``forward``: :func:`fuse_projections` registers one :class:`FusedProjection` per group (as
``qkv_proj`` / ``gate_up_proj``) and puts a :class:`ProjectionSlice` of it where each separate
projection was. The stock forward calls ``self.q_proj(h)``, ``self.k_proj(h)``, ``self.v_proj(h)``
with the same tensor ``h``: the first slice called runs the fused GEMM and splits its output, the
others take their part of it. A slice called with any other tensor object runs the GEMM again, so
the output always equals the unfused model's; how the stock forward calls its projections decides
only whether the GEMM runs once per layer (tests/test_bench_fusion.py checks that it does with the
installed transformers, and that the logits match the unfused model's).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from modelfactory.benchmark.kernels import release_opaque

#: Projection groups fused per module: the fused module's name, the separate projections' names,
#: and the attributes that identify the module (Llama-style attention and MLP).
_GROUPS = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj"), ("o_proj", "head_dim")),
    ("gate_up_proj", ("gate_proj", "up_proj"), ("down_proj", "act_fn")),
)


class FusedProjection(torch.nn.Module):
    """One GEMM (``linear``) computing several projections of the same input, output columns in order.

    Its parts are read through :class:`ProjectionSlice` modules (:meth:`part`); calling it directly
    returns all parts concatenated.
    """

    def __init__(self, linear: torch.nn.Module, sizes: Sequence[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = tuple(sizes)
        # The last input and its split output, until every part of it has been read once.
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._unread = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output columns of part *index* for input *x* (one GEMM serves all parts of one input).

        The cached split is keyed by the input's identity, held here so it cannot be freed and its
        id reused; transformers never writes into the hidden states between the projections.
        """
        if self._input is not x:
            self._parts = self.linear(x).split(self.sizes, dim=-1)
            self._input = x
            self._unread = len(self.sizes)
        out = self._parts[index]
        self._unread -= 1
        if self._unread == 0:  # all parts read: keep no activation alive past the layer
            self._input, self._parts = None, ()
        return out


class ProjectionSlice(torch.nn.Module):
    """Stands where one separate projection stood: part *index* of a :class:`FusedProjection`."""

    def __init__(self, source: FusedProjection, index: int) -> None:
        super().__init__()
        # A plain reference, not a submodule: the parent registers the fused module once, so its
        # weights are not listed, moved or saved once per slice.
        self.__dict__["source"] = source
        self.index = index
        self.in_features = source.linear.in_features
        self.out_features = source.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.source.sizes}"


class FusedMarlinLinear(torch.nn.Module):
    """One Marlin GEMM over the output columns of several ``MarlinLinear`` parts (same input).

    Marlin's packed weight is laid out row-major over (16-row k tile, 64-column n tile) and its
    scale permutation acts within 64-column chunks, so concatenating packed weights and scales
    along the output dimension equals packing the concatenated GPTQ weight when every part's
    width is a multiple of 64 (bench/marlin_gemv.py checks this on a GPU); parts with act-order,
    a bias or tile padding are refused. ``atomics``: Marlin's atomic-add reduce (GPTQModel enables
    it only for N < 2048; a measured option, not the default).
    """

    _mf_opaque = True  # torch.compile reaches it through the opaque custom op (kernels.py)

    def __init__(self, parts: Sequence[torch.nn.Module], *, atomics: bool = False) -> None:
        for p in parts:
            if p.desc_act or p.bias is not None or p._marlin_tile_padding is not None or p.out_features % 64:
                raise ValueError(f"cannot fuse Marlin layer {type(p).__name__} (act-order, bias or padding)")
        from gptqmodel.utils import marlin

        super().__init__()
        first = parts[0]
        self._marlin = marlin
        self.atomics = atomics
        self.in_features = first.in_features
        self.out_features = sum(p.out_features for p in parts)
        self.register_buffer("qweight", torch.cat([p.qweight.data for p in parts], dim=1), persistent=False)
        self.register_buffer("scales", torch.cat([p.scales.data for p in parts], dim=1), persistent=False)
        self.qzeros, self.g_idx, self.g_idx_sort_indices = first.qzeros, first.g_idx, first.g_idx_sort_indices
        self.workspace, self.weight_type, self.is_k_full, self.fp32 = (
            first.workspace, first.weight_type, first.is_k_full, first.fp32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.atomics:
            flat = x.reshape(-1, x.shape[-1])
            out = self._marlin.gptq_marlin_gemm(
                flat, None, self.qweight, None, self.scales, None, self.qzeros, self.g_idx, self.g_idx_sort_indices,
                self.workspace, self.weight_type, size_m=flat.shape[0], size_n=self.out_features,
                size_k=self.in_features, is_k_full=self.is_k_full, use_atomic_add=True, use_fp32_reduce=self.fp32,
                is_zp_float=False)
            return out.reshape(*x.shape[:-1], self.out_features)
        return self._marlin.apply_gptq_marlin_linear(
            input=x, weight=self.qweight, weight_scale=self.scales, weight_zp=self.qzeros, g_idx=self.g_idx,
            g_idx_sort_indices=self.g_idx_sort_indices, workspace=self.workspace, wtype=self.weight_type,
            output_size_per_partition=self.out_features, input_size_per_partition=self.in_features,
            is_k_full=self.is_k_full, bias=None, use_fp32_reduce=self.fp32, use_atomics=False)


def _fuse_dense(parts: Sequence[torch.nn.Linear]) -> torch.nn.Linear:
    first = parts[0]
    fused = torch.nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                            device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts], dim=0))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts], dim=0))
    return fused


def _fuse(parts: Sequence[torch.nn.Module], *, marlin_atomics: bool = False) -> torch.nn.Module:
    """One GEMM module computing all *parts* (same input); the parts' weight storage is released."""
    if all(type(p) is torch.nn.Linear for p in parts):
        fused, names = _fuse_dense(parts), ("weight", "bias")
    elif all(type(p).__name__ == "MarlinLinear" for p in parts):
        fused, names = FusedMarlinLinear(parts, atomics=marlin_atomics), ("qweight", "scales")
        for p in parts:
            release_opaque(p)
    else:
        raise ValueError(f"cannot fuse {[type(p).__name__ for p in parts]}: only dense and Marlin layers")
    for p in parts:  # free now, not at the next gc: fusing must not hold two copies of the weights
        for name in names:
            tensor = getattr(p, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.new_empty(0)
    return fused


def fuse_projections(model: torch.nn.Module, *, marlin_atomics: bool = False) -> int:
    """Replace q/k/v and gate/up of every Llama-style layer by one GEMM each (in place).

    Dense layers: concatenated weights (cuBLAS). Marlin layers: concatenated packed weights. The
    separate weights are freed. Returns the number of modules fused; modules of other shapes or
    kernels, and groups already fused, are left alone. ``marlin_atomics``: every Marlin GEMM
    (o/down too) uses Marlin's atomic-add reduce (measured option, not the default).
    """
    if marlin_atomics:
        for module in list(model.modules()):
            for name in ("o_proj", "down_proj"):
                child = getattr(module, name, None)
                if child is not None and type(child).__name__ == "MarlinLinear":
                    setattr(module, name, _fuse([child], marlin_atomics=True))
    fused = 0
    for module in list(model.modules()):
        for fused_name, names, marks in _GROUPS:
            if not all(hasattr(module, n) for n in (*names, *marks)):
                continue
            parts = [getattr(module, n) for n in names]
            try:
                linear = _fuse(parts, marlin_atomics=marlin_atomics)
            except ValueError:
                break
            projection = FusedProjection(linear, [p.out_features for p in parts])
            setattr(module, fused_name, projection)
            for index, name in enumerate(names):
                setattr(module, name, ProjectionSlice(projection, index))
            fused += 1
            break  # one group per module, as attention and MLP are separate modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return fused
