"""Layer widths of a model, and the GPTQ group size its artifact can be loaded with (pure functions).

Why the group size must fit the widths: a GPTQ layer keeps one scale per ``group_size`` input
columns, and the kernels that load the artifact with default settings need every quantized
linear's *input* width K to be a multiple of the group size:

- on CPU, GPTQModel picks ``TorchAtenLinear`` (torch's int4pack matmul) for 4-bit group sizes
  16-128; ``aten::_weight_int4pack_mm_cpu`` raises "expect K to be divisible by qGroupSize"
  otherwise (SmolLM2-135M: K=576 with group 128). GPTQModel's selection validates the config,
  not the shapes, so it does not fall back to another kernel;
- on CUDA, Marlin and Machete reject ``in_features % group_size != 0`` too.

The *output* widths have constraints of their own (Machete on Hopper: out_features % 128, in
% 64; Marlin: multiples of 8), but those do not depend on the group size, so they play no part
here; :func:`LayerWidths.not_multiple_of` names them for the error explanations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from modelfactory.core.errors import SpecError
from modelfactory.core.records import Record

#: The group sizes ``group_size: auto`` chooses from, in order of preference (largest first:
#: fewer scales, smaller artifact); every GPTQModel 4-bit kernel (CPU int4pack, Marlin,
#: Machete for 64/128, Triton, torch) accepts these.
PREFERRED_GROUP_SIZES: tuple[int, ...] = (128, 64, 32)


class LayerWidths(Record):
    """``(in_features, out_features)`` of each quantized linear of one decoder layer, by name."""

    linears: dict[str, tuple[int, int]]

    @property
    def in_features(self) -> tuple[int, ...]:
        return tuple(sorted({k for k, _ in self.linears.values()}))

    @property
    def out_features(self) -> tuple[int, ...]:
        return tuple(sorted({n for _, n in self.linears.values()}))

    def with_width(self, width: int, *, side: str = "in") -> list[str]:
        """Names of the linears whose input (``side="in"``) or output width is *width*."""
        index = 0 if side == "in" else 1
        return [name for name, dims in self.linears.items() if dims[index] == width]

    def not_multiple_of(self, divisor: int, *, side: str = "in") -> list[str]:
        """``name (width)`` of the linears whose input or output width is not a multiple of *divisor*."""
        index = 0 if side == "in" else 1
        return [f"{name} ({dims[index]})" for name, dims in self.linears.items() if dims[index] % divisor]


def _int(config: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SpecError(
            f"config.json (model_type {config.get('model_type')!r}) has no usable {key!r} (got {value!r}), so the "
            f"layer widths for quantize.group_size 'auto' are unknown: set quantize.group_size explicitly "
            f"(one of {PREFERRED_GROUP_SIZES} that divides every layer's input width)"
        )
    return value


def layer_widths_from_config(config: Mapping[str, Any]) -> LayerWidths:
    """The quantized linears' widths of a Llama-family ``config.json`` (Llama, Mistral, Qwen2/3, Gemma...).

    Attention: q/k/v take ``hidden_size`` and give ``heads × head_dim`` / ``kv_heads × head_dim``;
    o takes ``heads × head_dim`` (not always ``hidden_size``: Qwen3, Gemma set ``head_dim``).
    MLP: gate/up take ``hidden_size`` and give ``intermediate_size``; down the reverse. Mixture-of-
    experts configs add the experts' (``moe_intermediate_size``) and shared expert's MLP widths.
    ``lm_head`` and the embeddings are not quantized (GPTQModel's default), so they are not listed.
    """
    if isinstance(config.get("text_config"), Mapping):  # multimodal wrappers keep the LM config inside
        config = config["text_config"]
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads", default=heads)
    head_dim = _int(config, "head_dim", default=hidden // heads if hidden % heads == 0 else None)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    linears: dict[str, tuple[int, int]] = {
        "self_attn.q_proj": (hidden, q_width),
        "self_attn.k_proj": (hidden, kv_width),
        "self_attn.v_proj": (hidden, kv_width),
        "self_attn.o_proj": (q_width, hidden),
    }
    mlps: dict[str, int] = {}
    if "intermediate_size" in config or "moe_intermediate_size" not in config:
        mlps["mlp"] = _int(config, "intermediate_size")
    for key, prefix in (("moe_intermediate_size", "mlp.experts"),
                        ("shared_expert_intermediate_size", "mlp.shared_expert")):
        if config.get(key):
            mlps[prefix] = _int(config, key)
    for prefix, intermediate in mlps.items():
        linears[f"{prefix}.gate_proj"] = (hidden, intermediate)
        linears[f"{prefix}.up_proj"] = (hidden, intermediate)
        linears[f"{prefix}.down_proj"] = (intermediate, hidden)
    return LayerWidths(linears=linears)


def fitting_group_sizes(in_features: Iterable[int], *, candidates: Iterable[int] = PREFERRED_GROUP_SIZES
                        ) -> list[int]:
    """The *candidates* (in their order) that divide every input width."""
    widths = sorted(set(in_features))
    if not widths:
        raise SpecError("no layer widths given: cannot choose a group size from nothing")
    return [g for g in candidates if all(k % g == 0 for k in widths)]


def choose_group_size(*, in_features: Iterable[int], preferred: Iterable[int] = PREFERRED_GROUP_SIZES) -> int:
    """The first *preferred* group size (default: the largest of 128, 64, 32) dividing every input width.

    Only input widths matter (see the module doc). SmolLM2-135M (576, 1536) gives 64;
    Llama-2-7B (4096, 11008) gives 128. Raises :class:`SpecError` when none fits: a model whose
    widths are not multiples of 32 cannot be run by the default kernels with any of these, and the
    choice (``-1``, one group per row, or a smaller group such as 16) is a trade-off to make explicitly.
    """
    widths = sorted(set(in_features))
    preferred = tuple(preferred)
    fitting = fitting_group_sizes(widths, candidates=preferred)
    if fitting:
        return fitting[0]
    odd = ", ".join(f"{k} (= {k // _largest_power_of_two(k)} x {_largest_power_of_two(k)})"
                    for k in widths if any(k % g for g in preferred))
    raise SpecError(
        f"no group size in {preferred} divides every quantized layer's input width: {odd}. "
        f"GPTQ kernels (CPU int4pack, Marlin, Machete) need the input width to be a multiple of the group size: "
        f"set quantize.group_size explicitly (-1 = one group per row, or a divisor such as 16) and check that "
        f"the plain-load check passes"
    )


def _largest_power_of_two(n: int) -> int:
    return n & -n
