"""Why a model failed to load or run, whose fault it is, and what to do: from the library's own error.

:func:`classify_failure` matches the error (and the traceback tail, where the library raised it) against
:data:`KNOWN_FAILURES`: each known pattern has a kind and an explainer that names the layers, widths and the fix.
``environment``: the host could not run the check (no network for a kernel's sources, no toolchain, out of
memory, killed, a timeout); ``kernel``: the library's default kernel cannot serve this model's shapes (another
standard kernel may); ``artifact``: anything else, passed through with the library's message. Used by the
runnability check (:mod:`modelfactory.benchmark.runnability`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal

from modelfactory.benchmark.layer_widths import LayerWidths, fitting_group_sizes

#: Whose fault a failed attempt is (:data:`KNOWN_FAILURES`).
FailureKind = Literal["environment", "kernel", "artifact"]
#: Group sizes offered as fixes (larger first), as far as they divide the widths.
FIX_GROUP_SIZES = (128, 64, 32, 16)


def _fix_groups(widths: Sequence[int], *, current: int | None) -> str:
    fitting = [g for g in fitting_group_sizes(widths, candidates=FIX_GROUP_SIZES) if g != current]
    if not fitting:
        return ("no group size of 16 or more divides every input width: quantize with group_size -1 "
                "(one group per row)")
    first, rest = fitting[0], fitting[1:]
    return f"use group_size {first}" + (f" (or {' or '.join(map(str, rest))})" if rest else "") + (
        "; quantize.group_size 'auto' chooses it from the layer widths")


def _in_widths(widths: LayerWidths | None, fallback: int) -> tuple[int, ...]:
    return widths.in_features if widths is not None else (fallback,)


def _layers(widths: LayerWidths | None, width: int, side: str) -> str:
    names = widths.with_width(width, side=side) if widths is not None else []
    return f" ({', '.join(names)})" if names else ""


def _group_does_not_divide(k: int, group: int, widths: LayerWidths | None, kernel: str) -> str:
    return (f"group size {group} does not divide layer width {k}{_layers(widths, k, 'in')}: the kernel "
            f"{kernel} needs every quantized layer's input width to be a multiple of the group size; "
            + _fix_groups(_in_widths(widths, k), current=group))


def _int4pack(m: re.Match, ctx: dict) -> str:
    k, group = int(m["k"]), int(m["g"])
    return _group_does_not_divide(k, group, ctx["widths"], "GPTQModel picks by default on CPU "
                                  f"({ctx['kernel'] or 'TorchAtenLinear'}, torch's int4pack matmul)")


def _in_group(m: re.Match, ctx: dict) -> str:
    return _group_does_not_divide(int(m["k"]), int(m["g"]), ctx["widths"], f"{m['cls']} (GPTQModel's default)")


#: Group sizes a kernel accepts where it matters for the advice (GPTQModel 7.6: ``SUPPORTS_GROUP_SIZE``).
KERNEL_GROUP_SIZES = {"MacheteLinear": (-1, 64, 128)}


def _shape(m: re.Match, ctx: dict) -> str:
    cls, side, width = m["cls"], m["side"], int(m["width"])
    divisor = int(m["div"].split(",")[0])
    widths: LayerWidths | None = ctx["widths"]
    others = widths.not_multiple_of(divisor, side=side) if widths is not None else []
    layers = ", ".join(others) if others else f"width {width}"
    where = "on this GPU" if ctx["device"] == "cuda" else f"on {ctx['device']}"
    text = (f"{cls}, the kernel GPTQModel picks by default {where}, needs every quantized layer's {side}put width "
            f"to be a multiple of {divisor}, and this model's {layers} are not. GPTQModel chooses the kernel for the "
            f"whole model from the quantization config alone and does not fall back; the group size does not change "
            f"these widths. Users load it with another standard kernel that takes them (the snippet the check verified "
            f"passes quantization_config=GPTQConfig(bits=..., backend=...))")
    if cls in KERNEL_GROUP_SIZES:
        avoid = [g for g in FIX_GROUP_SIZES if g not in KERNEL_GROUP_SIZES[cls]]
        text += (f"; or the model can be quantized with a group size {cls} does not take (it takes "
                 f"{', '.join(map(str, KERNEL_GROUP_SIZES[cls]))}; e.g. {avoid[0]}), so that GPTQModel's default skips it")
    return text


def _oom(m: re.Match, ctx: dict) -> str:
    return (f"not enough memory on {ctx['device']} to load and run the model ({m[0][:120]}): users need a machine "
            f"with more free memory; the factory's check ran next to whatever else uses this machine")


def _timeout(m: re.Match, ctx: dict) -> str:
    return (f"did not load and generate within {ctx['timeout_s']:.0f} s and was killed; a first load on a fresh "
            f"GPU machine may spend minutes compiling GPTQModel's kernels: raise the timeout, or read the log")


def _kernel_download(m: re.Match, ctx: dict) -> str:
    return ("GPTQModel's Machete kernel (its default for GPTQ on Hopper GPUs) needs the CUTLASS v4.7.1 sources, "
            "which it downloads the first time it is used, and this host could not reach the network (the host, "
            "not the artifact): point GPTQMODEL_CUTLASS_DIR at a CUTLASS v4.7.1 checkout or run `modelfactory kernels "
            "prepare` once on a host with network access and keep MODELFACTORY_CACHE_DIR (the worker image does "
            "both), or load with another standard backend, as the verified snippet does")


def _toolchain(m: re.Match, ctx: dict) -> str:
    return (f"a kernel could not be compiled on this host: its build toolchain is missing or failed ({m[0][:160]}); "
            f"the host, not the artifact: install the CUDA toolkit / a C++ compiler (the worker image has them) or "
            f"prebuild the kernels with `modelfactory kernels prepare`")


def _killed(m: re.Match, ctx: dict) -> str:
    return ("the process was killed (SIGKILL: the out-of-memory killer, most likely) while loading or generating: "
            "the host, not the artifact; run the check where more memory is free")


#: (pattern on "ErrorType: message" + the traceback tail, explainer, whose fault). First match wins; unknown
#: errors pass through as the artifact's. ``environment``: the host could not run the check (network, toolchain,
#: memory, time); ``kernel``: the library's default kernel cannot serve this model's shapes (another standard
#: kernel may); ``artifact``: anything else.
KNOWN_FAILURES: tuple[tuple[re.Pattern[str], Callable[[re.Match, dict], str], FailureKind], ...] = (
    (re.compile(r"expect K to be divisible by qGroupSize, got K:\s*(?P<k>\d+), qGroupSize:\s*(?P<g>\d+)"), _int4pack,
     "kernel"),
    (re.compile(r"(?P<cls>\w+Linear)\W*:\s*`?in_features`?:\s*(?P<k>\d+) must be divisible by `?group_size:\s*(?P<g>\d+)"),
     _in_group, "kernel"),
    (re.compile(r"(?P<cls>\w+Linear)\W*:\s*`?(?P<side>in|out)_features`?:\s*(?P<width>\d+) must be divisible by "
                r"\[(?P<div>[\d,\s]+)\]"), _shape, "kernel"),
    (re.compile(r"(?i)OutOfMemoryError.*|CUDA out of memory.*|DefaultCPUAllocator: not enough memory.*"), _oom,
     "environment"),
    (re.compile(r"^Timeout\b"), _timeout, "environment"),
    (re.compile(r"^ProcessDied: .*code -9\b"), _killed, "environment"),
    (re.compile(r"(?s)^(?=.*(?:_ensure_cutlass_source|CUTLASS))"
                r"(?=.*(?:URLError|urlopen|name resolution|GPTQMODEL_OFFLINE|Network is unreachable))"),
     _kernel_download, "environment"),
    (re.compile(r"(?i)(nvcc[^\n]{0,40}not found|No such file or directory: '(nvcc|c\+\+|g\+\+|gcc|ninja)'|"
                r"Ninja is required|CUDA_HOME environment variable is not set|error: command '[^']*' failed)"),
     _toolchain, "environment"),
)


def classify_failure(*, error_type: str | None, message: str | None, device: str,
                     widths: LayerWidths | None = None, kernel: str | None = None, stage: str = "load",
                     timeout_s: float = 0.0, traceback_tail: str | None = None) -> tuple[FailureKind, str]:
    """Whose fault a failure is and what to do, from the library's error (and where it was raised: the
    traceback tail): known patterns get their kind and advice; others are the artifact's and pass through."""
    error = f"{error_type or 'Error'}: {message or '(no message)'}"
    ctx = {"device": device, "widths": widths, "kernel": kernel, "stage": stage, "timeout_s": timeout_s}
    for pattern, explain, kind in KNOWN_FAILURES:
        match = pattern.search(error) or (pattern.search(f"{traceback_tail}\n{error}") if traceback_tail else None)
        if match:
            return kind, f"{explain(match, ctx)}. Library error at {stage}: {_first_line(error)}"
    return "artifact", (f"plain transformers failed at {stage} on {device} with {_first_line(error)} "
                        f"(not a known pattern: see the library's message and the traceback tail)")


def explain_failure(**failure) -> str:
    """What failed and what to do (:func:`classify_failure`'s text)."""
    return classify_failure(**failure)[1]


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 400 else line[:400] + "..."
