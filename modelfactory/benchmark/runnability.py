"""Does the artifact run where users run it? Load it with plain transformers and generate.

:func:`check_runs_plainly` runs :mod:`modelfactory.benchmark.plain_load` *by file path* in a
``python -I`` process (no factory code, no ``PYTHONPATH``, default settings: exactly the
"Load it" snippet a user copies from the model card) once per device: on CPU always, on CUDA
when a GPU is visible. On CPU that process is forked from a ``python -I`` server that has imported
torch and transformers and nothing else (:func:`modelfactory.core.forkserver.fork_script`; ~5 s of
CPU less per check; ``MODELFACTORY_FORK_SERVER=false`` starts it fresh): the snippet then loads and
generates as in a fresh process, and the result still lists any factory module found imported.
The CPU run hides the GPUs (``CUDA_VISIBLE_DEVICES=""``) as a CPU-only machine would. Each run is
bounded by a timeout and yields one :class:`RunnabilityResult`; a failure carries the library's own
error and an explanation of what to do (:func:`explain_failure`), e.g. a group size that does not
divide a layer's width.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modelfactory.benchmark import plain_load
from modelfactory.benchmark.layer_widths import (
    LayerWidths,
    fitting_group_sizes,
    layer_widths_from_config,
)
from modelfactory.core.devices import gpu_env
from modelfactory.core.errors import SpecError
from modelfactory.core.forkserver import ForkedProcess, fork_script
from modelfactory.core.log import progress
from modelfactory.core.records import Record
from modelfactory.core.settings import get_settings

PLAIN_LOAD_SCRIPT = Path(plain_load.__file__).resolve()
Device = Literal["cpu", "cuda"]
#: How a check's process started: a fresh ``python -I``, or forked from an isolated warm server.
ProcessStart = Literal["fresh", "forked"]
#: Group sizes offered as fixes (larger first), as far as they divide the widths.
FIX_GROUP_SIZES = (128, 64, 32, 16)


class RunnabilityResult(Record):
    """One plain-transformers load + generate of an artifact on one device."""

    device: Device
    ok: bool
    #: The code that ran (the model card's "Load it" snippet, with the local folder as the model).
    snippet: str
    #: Where it stopped: import | load | generate | done (or process: the process died / timed out).
    stage: str
    wall_s: float  # the whole process: interpreter start (fresh only), imports, load, generate
    #: Forked from a server that had imported torch and transformers: ``import_s`` is then ~0.
    process: ProcessStart = "fresh"
    import_s: float | None = None
    load_s: float | None = None
    generate_s: float | None = None
    tokens: int = 0
    text: str | None = None
    #: Class of a quantized linear the library picked (e.g. ``TorchAtenLinear``), ``dense`` if none.
    kernel: str | None = None
    device_name: str | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    #: Factory modules found imported in the child (must be empty; non-empty fails the check).
    factory_modules: tuple[str, ...] = ()
    error_type: str | None = None
    error_message: str | None = None
    traceback_tail: str | None = None
    #: What went wrong and what to do, for people (None when ok).
    explanation: str | None = None

    def entry(self) -> dict[str, Any]:
        """What the manifest, the model card and the catalog show of this check:
        ``{device, ok, load_s, generate_s, error, advice, snippet}`` (the snippet as it ran)."""
        return check_entry(self.model_dump())


def check_entry(data: Mapping[str, Any]) -> dict[str, Any]:
    """One check as the manifest, the model card and the catalog show it:
    ``{device, ok, load_s, generate_s, error, advice, snippet}``. *data*: a :class:`RunnabilityResult`
    dumped to a dict, or an entry already in that form (``error_type``/``error_message`` fold into
    ``error``, ``explanation`` into ``advice``)."""
    error = data.get("error")
    if error is None and data.get("error_type"):
        error = f"{data['error_type']}: {data.get('error_message') or ''}".strip()
    return {"device": data.get("device"), "ok": bool(data.get("ok")), "load_s": data.get("load_s"),
            "generate_s": data.get("generate_s"), "error": error,
            "advice": data.get("advice") or data.get("explanation"), "snippet": data.get("snippet")}


class RunnabilityReport(Record):
    """The plain-load check on every device it ran on."""

    model_dir: str
    results: tuple[RunnabilityResult, ...]

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def failures(self) -> list[RunnabilityResult]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        if self.passed:
            return "runs in plain transformers on " + ", ".join(
                f"{r.device} ({r.kernel}, {r.tokens} tokens in {r.wall_s:.1f} s)" for r in self.results)
        return "; ".join(f"does not run in plain transformers on {r.device}: {r.explanation}" for r in self.failures())


def load_snippet(*, model: str, device: Device, revision: str | None = None,
                 prompt: str = plain_load.DEFAULT_PROMPT, new_tokens: int = plain_load.DEFAULT_NEW_TOKENS) -> str:
    """The "Load it" snippet: the code :func:`check_runs_plainly` runs, for *model* (a folder or Hub repo id).

    The model card embeds this with the published repo id (and *revision*); the check ran the
    same text with the local folder (``RunnabilityResult.snippet``) and the same prompt and
    token count.
    """
    return plain_load.snippet(model=model, device=device, revision=revision, prompt=prompt, new_tokens=new_tokens)


# --------------------------------------------------------------------------- explanations
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
            f"these widths. Users can load it with a kernel that takes them, e.g. from_pretrained(..., "
            f"quantization_config=GPTQConfig(bits=4, backend=\"gptq_triton\")) (the factory's benchmark loads such "
            f"widths with it)")
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
    return ("GPTQModel's Machete kernel (its default for GPTQ on Hopper GPUs) downloads the CUTLASS sources the "
            "first time it is used, and this host could not reach the network: run the first load on a host with "
            "network access and keep GPTQModel's cache (MODELFACTORY_CACHE_DIR), or load with another backend, "
            "e.g. from_pretrained(dir, device_map='cuda', quantization_config=GPTQConfig(bits=4, backend='marlin'))")


#: (pattern on "ErrorType: message" + the traceback tail, explainer). First match wins; unknown errors pass through.
KNOWN_FAILURES: tuple[tuple[re.Pattern[str], Callable[[re.Match, dict], str]], ...] = (
    (re.compile(r"expect K to be divisible by qGroupSize, got K:\s*(?P<k>\d+), qGroupSize:\s*(?P<g>\d+)"), _int4pack),
    (re.compile(r"(?P<cls>\w+Linear)\W*:\s*`?in_features`?:\s*(?P<k>\d+) must be divisible by `?group_size:\s*(?P<g>\d+)"),
     _in_group),
    (re.compile(r"(?P<cls>\w+Linear)\W*:\s*`?(?P<side>in|out)_features`?:\s*(?P<width>\d+) must be divisible by "
                r"\[(?P<div>[\d,\s]+)\]"), _shape),
    (re.compile(r"(?i)OutOfMemoryError.*|CUDA out of memory.*|DefaultCPUAllocator: not enough memory.*"), _oom),
    (re.compile(r"^Timeout\b"), _timeout),
    (re.compile(r"(?s)_ensure_cutlass_source.*(URLError|urlopen|name resolution)"), _kernel_download),
)


def explain_failure(*, error_type: str | None, message: str | None, device: str, widths: LayerWidths | None = None,
                    kernel: str | None = None, stage: str = "load", timeout_s: float = 0.0,
                    traceback_tail: str | None = None) -> str:
    """What failed and what to do, from the library's error (and where it was raised: the traceback
    tail): known patterns get advice, others pass through."""
    error = f"{error_type or 'Error'}: {message or '(no message)'}"
    ctx = {"device": device, "widths": widths, "kernel": kernel, "stage": stage, "timeout_s": timeout_s}
    for pattern, explain in KNOWN_FAILURES:
        match = pattern.search(error) or (pattern.search(f"{traceback_tail}\n{error}") if traceback_tail else None)
        if match:
            return f"{explain(match, ctx)}. Library error at {stage}: {_first_line(error)}"
    return (f"plain transformers failed at {stage} on {device} with {_first_line(error)} "
            f"(not a known pattern: see the library's message and the traceback tail)")


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 400 else line[:400] + "..."


# --------------------------------------------------------------------------- the check
def _widths(model_dir: Path) -> LayerWidths | None:
    try:
        return layer_widths_from_config(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError, SpecError):
        return None  # the explanation then names only the width in the error message


def _parse(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith('{"plain_load":'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def resolve_devices(devices: Sequence[str] | Literal["auto"]) -> tuple[Device, ...]:
    """``auto``: CPU, plus CUDA when torch sees a GPU. Explicit lists are checked, in order, deduplicated."""
    if devices == "auto":
        import torch

        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    chosen: list[Device] = []
    for device in devices:
        if device not in plain_load.DEVICES:
            raise SpecError(f"runnability device {device!r} is not one of {plain_load.DEVICES}")
        if device not in chosen:
            chosen.append(device)  # type: ignore[arg-type]
    if not chosen:
        raise SpecError("no device given for the runnability check: pass 'auto' or e.g. ['cpu']")
    return tuple(chosen)


def run_plain_load(*, model_dir: Path, device: Device, timeout_s: float, new_tokens: int, prompt: str,
                   log_path: Path | None = None) -> RunnabilityResult:
    """One ``python -I plain_load.py`` process on *device* (on CPU forked from a warm isolated server where
    one runs, else fresh); never raises for a failed load."""
    # The factory's kernel caches (a first CUDA load compiles for minutes), but not its worker count: a user sets none.
    caches = {k: v for k, v in gpu_env().items() if k != "GPTQMODEL_CPU_WORKERS"}
    env = {**os.environ, **caches, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU
    cmd = [sys.executable, "-I", str(PLAIN_LOAD_SCRIPT), str(model_dir), "--device", device,
           "--new-tokens", str(new_tokens), "--prompt", prompt]
    snippet = plain_load.snippet(model=str(model_dir), device=device, prompt=prompt, new_tokens=new_tokens)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mf-plain-load-") as cwd:  # libraries write ./logs and the like
        # CUDA is hidden on CPU, so nothing initialises it in the server: forking is safe on any host.
        proc = fork_script(script=PLAIN_LOAD_SCRIPT, args=cmd[3:], env=env, cwd=Path(cwd)) if (
            device == "cpu" and get_settings().fork_server) else None
        process: ProcessStart = "fresh" if proc is None else "forked"
        if proc is None:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    errors="replace", start_new_session=True)
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_session(proc)
            stdout, stderr = proc.communicate()
        except BaseException:
            _kill_session(proc)
            proc.communicate()
            raise
    wall_s = time.perf_counter() - start
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"# the snippet that ran:\n{snippet}$ {' '.join(cmd)}{'  # forked' if process == 'forked' else ''}\n"
                      f"{stdout}{stderr}\n"
                      f"[exit {proc.returncode}, {wall_s:.1f} s]\n")
    if timed_out:
        data = {"ok": False, "stage": "process", "error_type": "Timeout",
                "error_message": f"no result within {timeout_s:.0f} s; killed"}
    else:
        data = _parse(stdout) or {"ok": False, "stage": "process", "error_type": "ProcessDied",
                                  "error_message": f"plain_load exited with code {proc.returncode} without a result",
                                  "traceback_tail": "\n".join((stdout + stderr).strip().splitlines()[-15:])}
    return result_from_child(data, device=device, snippet=snippet, wall_s=wall_s, widths=_widths(model_dir),
                             timeout_s=timeout_s, process=process)


def _kill_session(proc: subprocess.Popen | ForkedProcess) -> None:
    """Kill the child and whatever it started (it runs in a session of its own; a forked one may be killed
    before it made its session, hence the child itself too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.kill()


def result_from_child(data: dict, *, device: Device, snippet: str, wall_s: float, widths: LayerWidths | None = None,
                      timeout_s: float = 0.0, process: ProcessStart = "fresh") -> RunnabilityResult:
    """The :class:`RunnabilityResult` for plain_load's JSON *data*, with the explanation of a failure.

    A run that imported factory code is void (it did not test what a user runs) and fails.
    """
    fields = {k: data.get(k) for k in ("import_s", "load_s", "generate_s", "text", "kernel", "device_name",
                                        "error_type", "error_message", "traceback_tail")}
    factory_modules = tuple(data.get("factory_modules") or ())
    stage = data.get("stage") or "process"
    ok = bool(data.get("ok"))
    explanation = None
    if ok and factory_modules:
        ok = False
        fields.update(error_type="FactoryImport",
                      error_message=f"factory modules were imported in the plain-load process: {', '.join(factory_modules)}")
        explanation = (f"the check is void: {fields['error_message']}; it must run without factory code "
                       f"(a library or a site hook imported it)")
    elif not ok and fields["error_type"] == "ProcessDied":
        explanation = (f"{fields['error_message']} (killed: out of memory, or a crash in native code); "
                       f"last output:\n{fields['traceback_tail']}")
    elif not ok:
        explanation = explain_failure(error_type=fields["error_type"], message=fields["error_message"], device=device,
                                      widths=widths, kernel=fields["kernel"], stage=stage, timeout_s=timeout_s,
                                      traceback_tail=fields.get("traceback_tail"))
    return RunnabilityResult(device=device, ok=ok, snippet=snippet, stage=stage, wall_s=wall_s, process=process,
                             tokens=int(data.get("tokens") or 0), versions=data.get("versions") or {},
                             factory_modules=factory_modules, explanation=explanation, **fields)


def check_runs_plainly(*, model_dir: str | Path, devices: Sequence[str] | Literal["auto"] = "auto",
                       timeout_s: float = 600.0, new_tokens: int = plain_load.DEFAULT_NEW_TOKENS,
                       prompt: str = plain_load.DEFAULT_PROMPT, log_path: Path | None = None) -> RunnabilityReport:
    """Load *model_dir* with plain ``transformers`` and generate *new_tokens* greedy tokens, on each device.

    Each device runs in its own process bounded by *timeout_s* (a first CUDA load may
    compile GPTQModel kernels for minutes). Never raises for an artifact that fails to run: the
    report says why, and the gate decides.
    """
    model_dir = Path(model_dir).resolve()
    results = []
    for device in resolve_devices(devices):
        progress(f"runnability: loading {model_dir.name} with plain transformers on {device}")
        result = run_plain_load(model_dir=model_dir, device=device, timeout_s=timeout_s, new_tokens=new_tokens,
                                prompt=prompt, log_path=log_path)
        progress(f"runnability: {device}: " + (f"ok ({result.kernel}, {result.tokens} tokens, {result.wall_s:.1f} s)"
                                               if result.ok else f"FAILED: {result.explanation}"))
        results.append(result)
    return RunnabilityReport(model_dir=str(model_dir), results=tuple(results))
