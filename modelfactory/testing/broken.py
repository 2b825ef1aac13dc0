"""Deliberately broken GPTQ artifacts, made from a healthy one: what the default gate must reject.

Each maker copies a healthy GPTQ checkpoint folder (GPTQModel's ``checkpoint_format: gptq``, 4-bit,
``desc_act: false``) and damages its tensors in one named way; the result loads with every kernel,
as a real broken quantization would, and only a measurement can tell:

- ``rtn2``: every group's weights rounded to 2 bits (4 levels, min-max round-to-nearest), stored in
  the 4-bit format: what a collapsed low-bit quantization computes;
- ``scales``: every scale multiplied by a constant (a packing or dtype bug);
- ``g_idx``: each layer's group index shuffled (columns read with another group's scale);
- ``zero_layer``: one decoder layer's quantized weights all zero (its scales zeroed);
- ``nan``: one scale of one layer NaN (the logits become NaN).

Shared by the tests (``tests/test_smollm2_e2e.py``, the default gate on real weights) and ``bench/default_gate.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

#: The 4-bit GPTQ (v1) checkpoint layout these makers read: 8 values per int32 along the input dimension.
BITS = 4
PER_WORD = 32 // BITS


def _unpack_rows(qweight):
    """``[in / 8, out]`` int32 -> ``[in, out]`` int 0..15 (row ``8 * i + j`` is nibble ``j`` of word row ``i``)."""
    import torch

    shifts = torch.arange(PER_WORD, dtype=torch.int32) * BITS
    values = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF  # [in/8, 8, out]
    return values.reshape(-1, qweight.shape[-1])


def _pack_rows(values):
    """The inverse of :func:`_unpack_rows`."""
    import torch

    grouped = values.to(torch.int64).reshape(-1, PER_WORD, values.shape[-1])
    shifts = torch.arange(PER_WORD, dtype=torch.int64) * BITS
    packed = (grouped << shifts.view(1, -1, 1)).sum(1)  # 0 .. 2**32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same bits as int32


def _zeros(qzeros):
    """The real zero point of each group and column: v1 checkpoints store it minus one."""
    return _unpack_rows(qzeros.T).T + 1  # qzeros is [groups, out / 8], packed along the output dimension


def _modules(tensors: dict) -> list[str]:
    return sorted(name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight"))


def rtn2(tensors: dict, module: str) -> None:
    """2-bit min-max round-to-nearest of each group's dequantized weights, in the 4-bit container."""
    import torch

    qweight, scales, g_idx = (tensors[f"{module}.{k}"] for k in ("qweight", "scales", "g_idx"))
    zeros = _zeros(tensors[f"{module}.qzeros"])
    q = _unpack_rows(qweight)
    group = g_idx.long()
    weight = scales.float()[group] * (q - zeros[group]).float()  # [in, out]
    new_q = torch.empty_like(q)
    new_scales = torch.empty_like(scales, dtype=torch.float32)
    for g in range(scales.shape[0]):
        rows = group == g
        w = weight[rows]
        low, high = w.min(0).values, w.max(0).values
        step = ((high - low) / 3).clamp_min(1e-8)
        zero = (-low / step).round().clamp(0, 3)
        levels = ((w / step).round() + zero).clamp(0, 3)
        # s * (q4 - z4) == step * (levels - zero) with s = step, z4 = the stored zero point of this group
        new_q[rows] = (levels - zero + zeros[g]).to(q.dtype)
        new_scales[g] = step
    assert int(new_q.min()) >= 0 and int(new_q.max()) <= 15
    tensors[f"{module}.qweight"] = _pack_rows(new_q)
    tensors[f"{module}.scales"] = new_scales.to(scales.dtype)


def _scales_times(factor: float) -> Callable[[dict, str], None]:
    def damage(tensors: dict, module: str) -> None:
        tensors[f"{module}.scales"] = tensors[f"{module}.scales"] * factor
    return damage


def shuffle_g_idx(tensors: dict, module: str) -> None:
    import torch

    g_idx = tensors[f"{module}.g_idx"]
    generator = torch.Generator().manual_seed(len(g_idx))
    tensors[f"{module}.g_idx"] = g_idx[torch.randperm(len(g_idx), generator=generator)].contiguous()


def zero_scales(tensors: dict, module: str) -> None:
    tensors[f"{module}.scales"] = tensors[f"{module}.scales"] * 0


def nan_scale(tensors: dict, module: str) -> None:
    scales = tensors[f"{module}.scales"].clone()
    scales[0, 0] = float("nan")
    tensors[f"{module}.scales"] = scales


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def break_artifact(healthy: Path, out: Path, *, how: str, factor: float = 2.0, layer: int = 0) -> Path:
    """A copy of the *healthy* GPTQ folder in *out*, damaged *how* (the module docstring's names); *factor*
    for ``scales``, *layer* for ``zero_layer``."""
    from safetensors.torch import load_file, save_file

    makers: dict[str, tuple[Callable[[dict, str], None], Callable[[str], bool]]] = {
        "rtn2": (rtn2, lambda m: True),
        "scales": (_scales_times(factor), lambda m: True),
        "g_idx": (shuffle_g_idx, lambda m: True),
        "zero_layer": (zero_scales, lambda m: _layer(m) == layer),
        "nan": (nan_scale, lambda m: _layer(m) == layer and m.endswith("down_proj")),
    }
    if how not in makers:
        raise ValueError(f"unknown damage {how!r}: use one of {sorted(makers)}")
    damage, chosen = makers[how]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(healthy, out, ignore=shutil.ignore_patterns("_COMPLETE.json"))
    touched = 0
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(file)
        for module in _modules(tensors):
            if chosen(module):
                damage(tensors, module)
                touched += 1
        save_file(tensors, file, metadata={"format": "pt"})
    if not touched:
        raise ValueError(f"{how}: no quantized module of {healthy} matched (layer {layer})")
    return out
