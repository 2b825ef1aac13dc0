"""Does the artifact run where users run it, and compute what the factory measured?

The check has two halves:

1. **The factory's own reference** (:func:`measure_reference`, an isolated step process): the artifact
   loaded exactly as the benchmark loads it (its device, dtype and kernel,
   :func:`modelfactory.benchmark.sides.load_side`) generates ``check_tokens`` greedy tokens after the
   snippet's prompt, then scores that sequence teacher-forced: its most likely token at each position
   (``top1``, with the tokens it rates within ``near_tie_nats`` of it: ``near``), and whether every logit is
   finite. A reference that cannot run, or whose logits are not finite, rejects the artifact before the
   benchmark spends anything.
2. **Plain transformers, per device** (:func:`check_runs_plainly`): :mod:`modelfactory.benchmark.plain_load`
   runs *by file path* in a fresh ``python -I`` process (no factory code, no ``PYTHONPATH``, default
   settings: exactly the "Load it" snippet a user copies from the model card), on CPU always and on
   CUDA when a GPU is visible (the CPU run hides the GPUs, as a CPU-only machine would). It loads,
   generates, and scores the reference's tokens teacher-forced: it *works* when its argmax is the reference's
   top-1, or a token the reference rates as near-tied with it, on at least ``min_top1_agreement_pct`` of the
   positions (kernels and dtypes legitimately differ in the last bits, so a near-tie may flip; garbage lands
   far from the reference's top), and every logit is finite.

When the library's default loading path fails with an error on a device, the same check runs once more
with another standard GPTQModel kernel (:func:`fallback_backend`: Marlin or Triton on CUDA, the portable
torch kernel on CPU), so the card can say how to load the model there. Each failure is classified
(:func:`modelfactory.benchmark.load_failures.classify_failure`): **environment** (the host: no network for a kernel's sources, a missing
toolchain, out of memory, a timeout), **kernel** (the default kernel cannot serve this model's shapes) or
**artifact** (anything else, and any path whose output is wrong). Per device (:func:`device_verdict`):

- *verified*: a standard path works (the default, or the fallback kernel: the card says which);
- *broken*: a path ran and computed something else than the measured model (garbage, NaN), or every path
  failed and one of them for a reason that is not the host's or the default kernel's;
- *not verified*: every path failed for reasons of the host or the default kernel alone.

The report passes (:attr:`RunnabilityReport.passed`) when the reference ran, no device is broken and at
least one is verified; the gate's stricter ``require_default_path`` also needs every device's default
path. Each run is bounded by a timeout; a failure carries the library's own error and what to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modelfactory.benchmark import plain_load
from modelfactory.benchmark.kernels import choose_kernel
from modelfactory.benchmark.layer_widths import LayerWidths, layer_widths_from_config
from modelfactory.benchmark.load_failures import FailureKind, classify_failure
from modelfactory.core.devices import gpu_env
from modelfactory.core.gpu_share import gpu_turn
from modelfactory.core.errors import SpecError
from modelfactory.core.log import progress
from modelfactory.core.records import Record

PLAIN_LOAD_SCRIPT = Path(plain_load.__file__).resolve()
Device = Literal["cpu", "cuda"]
#: What the check concluded for one device (:func:`device_verdict`).
DeviceStatus = Literal["verified", "not_verified", "broken"]
#: The default tolerance of the teacher-forced comparison (``benchmark.runnability.min_top1_agreement_pct``).
DEFAULT_MIN_TOP1_AGREEMENT_PCT = 90.0


class RunnabilityReference(Record):
    """The factory's own run of the artifact (the benchmark's device, dtype and kernel), which every plain
    load is compared with: the prompt's tokens and the greedy continuation (``token_ids``) and the reference's
    most likely token at each continuation position (``top1``)."""

    ok: bool
    device: str
    dtype: str
    kernel: str | None = None
    prompt_len: int = 0
    token_ids: tuple[int, ...] = ()
    top1: tuple[int, ...] = ()
    #: Per continuation position, the tokens the reference rates within ``near_tie_nats`` of its top-1 (top-1 first):
    #: a plain load whose argmax is one of them agrees there.
    near: tuple[tuple[int, ...], ...] = ()
    near_tie_nats: float = 0.0
    logits_finite: bool | None = None
    text: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    failure_kind: FailureKind | None = None
    explanation: str | None = None

    def comparison(self) -> dict[str, Any]:
        """What plain_load's ``--reference`` file holds."""
        return {"token_ids": list(self.token_ids), "prompt_len": self.prompt_len, "top1": list(self.top1),
                "near": [list(ids) for ids in self.near]}


class RunnabilityResult(Record):
    """One plain-transformers load + generate + comparison of an artifact on one device, by one loading path."""

    device: Device
    #: The loading path: ``None`` = the library's default kernel; else the GPTQModel backend passed.
    backend: str | None = None
    #: It loaded, generated, its logits are finite and it agrees with the reference within the tolerance.
    ok: bool
    #: The code that ran (the model card's "Load it" snippet, with the local folder as the model).
    snippet: str
    #: Where it stopped: import | load | generate | compare | done (or process: the process died / timed out).
    stage: str
    wall_s: float  # the whole process: interpreter start, imports, load, generate, comparison
    import_s: float | None = None
    load_s: float | None = None
    generate_s: float | None = None
    tokens: int = 0
    text: str | None = None
    #: Teacher-forced against the reference: positions compared, % whose argmax agrees, all logits finite.
    positions: int = 0
    top1_agreement_pct: float | None = None
    logits_finite: bool | None = None
    #: Class of a quantized linear the library picked (e.g. ``TorchAtenLinear``), ``dense`` if none.
    kernel: str | None = None
    device_name: str | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    #: Factory modules found imported in the child (must be empty; non-empty fails the check).
    factory_modules: tuple[str, ...] = ()
    failure_kind: FailureKind | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback_tail: str | None = None
    #: What went wrong and what to do, for people (None when ok).
    explanation: str | None = None

    @property
    def path(self) -> str:
        """``default``, or the backend this attempt loaded with."""
        return self.backend or "default"

    def entry(self) -> dict[str, Any]:
        """What the manifest, the model card and the catalog show of this check (:func:`check_entry`)."""
        return check_entry(self.model_dump())


def check_entry(data: Mapping[str, Any]) -> dict[str, Any]:
    """One check as the manifest, the model card and the catalog show it: ``{device, path, ok, kernel,
    top1_agreement_pct, load_s, generate_s, error, advice, snippet}``. *data*: a :class:`RunnabilityResult`
    dumped to a dict, or an entry already in that form (``error_type``/``error_message`` fold into ``error``,
    ``explanation`` into ``advice``)."""
    error = data.get("error")
    if error is None and data.get("error_type"):
        error = f"{data['error_type']}: {data.get('error_message') or ''}".strip()
    return {"device": data.get("device"), "path": data.get("path") or data.get("backend") or "default",
            "ok": bool(data.get("ok")), "kernel": data.get("kernel"),
            "top1_agreement_pct": data.get("top1_agreement_pct"), "load_s": data.get("load_s"),
            "generate_s": data.get("generate_s"), "error": error,
            "advice": data.get("advice") or data.get("explanation"), "snippet": data.get("snippet")}


class DeviceVerdict(Record):
    """The check's conclusion for one device (:func:`device_verdict`)."""

    device: Device
    status: DeviceStatus
    #: The loading path verified (``default`` or a backend), when verified.
    path: str | None = None
    #: Whether the library's default path works on this device.
    default_ok: bool
    reason: str


def device_verdict(device: Device, attempts: Sequence[RunnabilityResult]) -> DeviceVerdict:
    """verified / broken / not verified, from the device's attempts (the module docstring says how)."""
    default_ok = any(a.ok and a.backend is None for a in attempts)
    wrong = [a for a in attempts if a.stage == "done" and not a.ok and a.failure_kind == "artifact"]
    if wrong:
        return DeviceVerdict(device=device, status="broken", default_ok=default_ok, reason=wrong[0].explanation or "")
    working = next((a for a in attempts if a.ok), None)
    failures = "; ".join(f"{a.path}: {a.explanation}" for a in attempts if not a.ok)
    if working is not None:
        compared = (f", top-1 {working.top1_agreement_pct:.1f} % of {working.positions}"
                    if working.top1_agreement_pct is not None else ", not compared with a reference")
        reason = f"{working.path} ({working.kernel}{compared})"
        return DeviceVerdict(device=device, status="verified", path=working.path, default_ok=default_ok,
                             reason=reason + (f"; {failures}" if failures else ""))
    if any(a.failure_kind in ("artifact", None) for a in attempts if not a.ok):  # unclassified: the artifact's
        return DeviceVerdict(device=device, status="broken", default_ok=False,
                             reason=f"no standard loading path works on {device}: {failures}")
    return DeviceVerdict(device=device, status="not_verified", default_ok=False,
                         reason=f"not verified on {device}, for reasons of the host or the default kernel (not the "
                                f"artifact's): {failures}")


class RunnabilityReport(Record):
    """The reference, and the plain-load check on every device it ran on (every attempt)."""

    model_dir: str
    reference: RunnabilityReference | None = None
    min_top1_agreement_pct: float = DEFAULT_MIN_TOP1_AGREEMENT_PCT
    results: tuple[RunnabilityResult, ...]

    @property
    def devices(self) -> tuple[DeviceVerdict, ...]:
        order = list(dict.fromkeys(r.device for r in self.results))
        return tuple(device_verdict(d, [r for r in self.results if r.device == d]) for d in order)

    @property
    def passed(self) -> bool:
        """The reference ran, no device is broken and one at least is verified (the default policy)."""
        verdicts = self.devices
        return (self.reference is None or self.reference.ok) and bool(verdicts) and all(
            v.status != "broken" for v in verdicts) and any(v.status == "verified" for v in verdicts)

    @property
    def default_path_works(self) -> bool:
        """Every device's default loading path works (the gate's ``require_default_path``)."""
        verdicts = self.devices
        return self.passed and all(v.default_ok for v in verdicts)

    @property
    def environment_only(self) -> bool:
        """Nothing was found wrong with the artifact, yet nothing could be verified: the host's doing."""
        if self.reference is not None and not self.reference.ok:
            return self.reference.failure_kind == "environment"
        verdicts = self.devices
        return bool(verdicts) and all(v.status == "not_verified" for v in verdicts)

    def failures(self) -> list[RunnabilityResult]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        if self.reference is not None and not self.reference.ok:
            return f"the factory's own run of the artifact failed: {self.reference.explanation}"
        parts = [f"{v.device}: {v.status.replace('_', ' ')} ({v.reason})" for v in self.devices]
        return "; ".join(parts) or "no device checked"

    def verified_paths(self) -> dict[str, str]:
        """Device -> the loading path verified there (``default`` or a backend)."""
        return {v.device: v.path for v in self.devices if v.status == "verified" and v.path}


def load_snippet(*, model: str, device: Device, revision: str | None = None,
                 prompt: str = plain_load.DEFAULT_PROMPT, new_tokens: int = plain_load.DEFAULT_NEW_TOKENS,
                 backend: str | None = None, bits: int | None = None) -> str:
    """The "Load it" snippet: the code :func:`check_runs_plainly` runs, for *model* (a folder or Hub repo id).

    The model card embeds this with the published repo id (and *revision*) and the path that was verified
    (*backend*); the check ran the same text with the local folder (``RunnabilityResult.snippet``) and the same
    prompt and token count.
    """
    return plain_load.snippet(model=model, device=device, revision=revision, prompt=prompt, new_tokens=new_tokens,
                              backend=backend, bits=bits)


# --------------------------------------------------------------------------- the reference
#: At most this many near-tied tokens are kept per position (:attr:`RunnabilityReference.near`).
MAX_NEAR = 16


def near_ties(logits, *, nats: float) -> list[list[int]]:
    """Per row of log-probs or logits ``[n, vocab]``: the ids within *nats* of the row's maximum, highest first (the
    argmax first: ``argmax`` picks the lowest id among exact ties), at most :data:`MAX_NEAR`."""
    top = logits.topk(MAX_NEAR, dim=-1)
    rows = []
    for argmax, values, ids, row_max in zip(logits.argmax(-1).tolist(), top.values.tolist(), top.indices.tolist(),
                                            logits.max(-1).values.tolist(), strict=True):
        near = [argmax] + [i for v, i in zip(values, ids, strict=True) if v >= row_max - nats and i != argmax]
        rows.append(near[:MAX_NEAR])
    return rows


def measure_reference(*, model_path: str, spec: dict, prompt: str, check_tokens: int,
                      near_tie_nats: float = 0.25) -> RunnabilityReference:
    """Process body: the artifact as the benchmark loads it (:func:`modelfactory.benchmark.sides.load_side`)
    generates *check_tokens* greedy tokens after *prompt*, then scores the whole sequence teacher-forced
    (``top1`` and its near-ties at each continuation position, finite logits). Never raises for an artifact
    that fails."""
    import torch
    from transformers import AutoTokenizer

    from modelfactory.benchmark.kernels import quantized_kernel_name
    from modelfactory.benchmark.sides import eager_on_cpu, load_side
    from modelfactory.core.devices import apply_memory_cap, resolve_device, resolve_dtype
    from modelfactory.core.specs import BenchmarkSpec

    bspec = BenchmarkSpec.model_validate(spec)
    device = resolve_device(bspec.device)
    apply_memory_cap(device)
    dtype = resolve_dtype(bspec.dtype, device)
    fields: dict[str, Any] = {"device": device, "dtype": dtype}
    stage = "load"
    try:
        # Eager on CPU, as the benchmark's sides; never during another member's timing (gpu_turn).
        with eager_on_cpu(device), gpu_turn(device, exclusive=False, what="runnability reference"):
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            model, _ = load_side(model_path, side="gptq", spec=bspec, device=device, dtype=getattr(torch, dtype))
            fields["kernel"] = quantized_kernel_name(model)
            stage = "generate"
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=check_tokens,
                                     min_new_tokens=check_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                logits = model(input_ids=out).logits[0, ids.shape[1] - 1 : -1].float()
            finite = bool(torch.isfinite(logits).all())
            near = near_ties(logits.log_softmax(-1), nats=near_tie_nats) if finite else []
            fields.update(prompt_len=ids.shape[1], token_ids=tuple(out[0].tolist()), top1=tuple(logits.argmax(-1).tolist()),
                          near=tuple(tuple(ids_) for ids_ in near), near_tie_nats=near_tie_nats, logits_finite=finite,
                          text=tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    except Exception as exc:  # the artifact (or the host) failed: described, classified, never raised
        import traceback

        kind, explanation = classify_failure(error_type=type(exc).__name__, message=str(exc)[:4000], device=device,
                                             kernel=fields.get("kernel"), stage=stage,
                                             traceback_tail=traceback.format_exc()[-6000:])
        return RunnabilityReference(ok=False, error_type=type(exc).__name__, error_message=str(exc)[:4000],
                                    failure_kind=kind, explanation=f"the benchmark's own loading path failed: "
                                                                   f"{explanation}", **fields)
    if not fields["logits_finite"]:
        return RunnabilityReference(ok=False, failure_kind="artifact", error_type="NonFiniteLogits",
                                    error_message="NaN or infinite logits", explanation=(
                                        f"the artifact's logits are not finite (NaN or inf) on {device} with the "
                                        f"benchmark's kernel {fields['kernel']}: its weights or scales are broken"),
                                    **fields)
    return RunnabilityReference(ok=True, **fields)


# --------------------------------------------------------------------------- plain transformers
def fallback_backend(model_dir: Path, *, device: Device) -> tuple[str, int] | None:
    """Another standard GPTQModel kernel for *device*, when the library's default loading path fails there:
    ``(backend, bits)`` (Marlin, or Triton for widths Marlin cannot tile, on CUDA; the portable torch kernel
    on CPU), or ``None`` for a model that is not a GPTQ checkpoint."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        qcfg = config["quantization_config"]
        widths = layer_widths_from_config(config).in_features
    except (OSError, ValueError, KeyError, TypeError, SpecError):
        return None
    backend = choose_kernel("auto", device=device, group_size=qcfg.get("group_size", -1), in_features=list(widths))
    return (backend if backend != "auto" else "gptq_torch"), int(qcfg["bits"])


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
                   reference: RunnabilityReference | None = None, backend: str | None = None, bits: int | None = None,
                   min_top1_agreement_pct: float = DEFAULT_MIN_TOP1_AGREEMENT_PCT,
                   log_path: Path | None = None) -> RunnabilityResult:
    """One fresh ``python -I plain_load.py`` process on *device*; never raises for a failed load."""
    # The factory's kernel caches (a first CUDA load compiles for minutes), but not its worker count: a user sets none.
    caches = {k: v for k, v in gpu_env().items() if k != "GPTQMODEL_CPU_WORKERS"}
    env = {**os.environ, **caches, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU
    snippet = plain_load.snippet(model=str(model_dir), device=device, prompt=prompt, new_tokens=new_tokens,
                                 backend=backend, bits=bits)
    with tempfile.TemporaryDirectory(prefix="mf-plain-load-") as cwd:  # libraries write ./logs and the like
        cmd = [sys.executable, "-I", str(PLAIN_LOAD_SCRIPT), str(model_dir), "--device", device,
               "--new-tokens", str(new_tokens), "--prompt", prompt]
        if backend is not None:
            cmd += ["--backend", backend, "--bits", str(bits)]
        if reference is not None:
            (Path(cwd) / "reference.json").write_text(json.dumps(reference.comparison()))
            cmd += ["--reference", str(Path(cwd) / "reference.json")]
        with gpu_turn(device, exclusive=False, what=f"runnability[{device}]"):  # never during another's timing
            start = time.perf_counter()
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
            log.write(f"# the snippet that ran:\n{snippet}$ {' '.join(cmd)}\n{stdout}{stderr}\n"
                      f"[exit {proc.returncode}, {wall_s:.1f} s]\n")
    if timed_out:
        data = {"ok": False, "stage": "process", "error_type": "Timeout",
                "error_message": f"no result within {timeout_s:.0f} s; killed"}
    else:
        data = _parse(stdout) or {"ok": False, "stage": "process", "error_type": "ProcessDied",
                                  "error_message": f"plain_load exited with code {proc.returncode} without a result",
                                  "traceback_tail": "\n".join((stdout + stderr).strip().splitlines()[-15:])}
    return result_from_child(data, device=device, snippet=snippet, wall_s=wall_s, widths=_widths(model_dir),
                             timeout_s=timeout_s, backend=backend, min_top1_agreement_pct=min_top1_agreement_pct)


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill the child and whatever it started (it runs in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.kill()


def result_from_child(data: dict, *, device: Device, snippet: str, wall_s: float, widths: LayerWidths | None = None,
                      timeout_s: float = 0.0, backend: str | None = None,
                      min_top1_agreement_pct: float = DEFAULT_MIN_TOP1_AGREEMENT_PCT) -> RunnabilityResult:
    """The :class:`RunnabilityResult` for plain_load's JSON *data*: judged against the reference (finite logits,
    top-1 agreement at least *min_top1_agreement_pct*), with the failure's kind and explanation.

    A run that imported factory code is void (it did not test what a user runs) and fails.
    """
    fields = {k: data.get(k) for k in ("import_s", "load_s", "generate_s", "text", "kernel", "device_name",
                                        "error_type", "error_message", "traceback_tail", "logits_finite")}
    factory_modules = tuple(data.get("factory_modules") or ())
    stage = data.get("stage") or "process"
    positions = int(data.get("positions") or 0)
    agreement = 100.0 * int(data.get("top1_agree") or 0) / positions if positions else None
    ok = bool(data.get("ok"))
    kind: FailureKind | None = None
    explanation = None
    if ok and factory_modules:
        ok, kind = False, "environment"
        fields.update(error_type="FactoryImport",
                      error_message=f"factory modules were imported in the plain-load process: {', '.join(factory_modules)}")
        explanation = (f"the check is void: {fields['error_message']}; it must run without factory code "
                       f"(a library or a site hook imported it)")
    elif ok and fields["logits_finite"] is False:
        ok, kind = False, "artifact"
        explanation = (f"loaded and generated on {device} ({fields['kernel']}), but its logits are not finite (NaN or "
                       f"inf): the artifact computes garbage there")
    elif ok and agreement is not None and agreement < min_top1_agreement_pct:
        ok, kind = False, "artifact"
        explanation = (f"loaded and generated on {device} ({fields['kernel']}), but computes something else than the "
                       f"model the factory measured: teacher-forced top-1 agreement {agreement:.1f} % of {positions} "
                       f"positions < {min_top1_agreement_pct:g} % (generated {fields['text']!r})")
    elif not ok and fields["error_type"] == "ProcessDied" and " code -9 " not in (fields["error_message"] or ""):
        kind = "artifact"
        explanation = (f"{fields['error_message']} (a crash in native code, most likely); last output:\n"
                       f"{fields['traceback_tail']}")
    elif not ok:
        kind, explanation = classify_failure(error_type=fields["error_type"], message=fields["error_message"],
                                             device=device, widths=widths, kernel=fields["kernel"], stage=stage,
                                             timeout_s=timeout_s, traceback_tail=fields.get("traceback_tail"))
    return RunnabilityResult(device=device, backend=backend, ok=ok, snippet=snippet, stage=stage, wall_s=wall_s,
                             tokens=int(data.get("tokens") or 0), versions=data.get("versions") or {},
                             positions=positions, top1_agreement_pct=agreement, factory_modules=factory_modules,
                             failure_kind=kind, explanation=explanation, **fields)


def check_runs_plainly(*, model_dir: str | Path, devices: Sequence[str] | Literal["auto"] = "auto",
                       timeout_s: float = 600.0, new_tokens: int = plain_load.DEFAULT_NEW_TOKENS,
                       prompt: str = plain_load.DEFAULT_PROMPT, reference: RunnabilityReference | None = None,
                       min_top1_agreement_pct: float = DEFAULT_MIN_TOP1_AGREEMENT_PCT,
                       log_path: Path | None = None) -> RunnabilityReport:
    """Load *model_dir* with plain ``transformers``, generate *new_tokens* greedy tokens and compare with
    *reference*, on each device; where the default loading path fails with an error, once more with
    :func:`fallback_backend`'s kernel.

    Each attempt runs in its own process bounded by *timeout_s* (a first CUDA load may compile GPTQModel
    kernels for minutes). Never raises for an artifact that fails to run: the report says why, and the gate
    decides.
    """
    model_dir = Path(model_dir).resolve()
    results = []
    for device in resolve_devices(devices):
        progress(f"runnability: loading {model_dir.name} with plain transformers on {device}")
        attempt = dict(model_dir=model_dir, device=device, timeout_s=timeout_s, new_tokens=new_tokens, prompt=prompt,
                       reference=reference, min_top1_agreement_pct=min_top1_agreement_pct, log_path=log_path)
        result = run_plain_load(**attempt)
        progress(f"runnability: {device}: {_outcome(result)}")
        results.append(result)
        fallback = fallback_backend(model_dir, device=device)
        if not result.ok and result.stage != "done" and fallback is not None:
            backend, bits = fallback
            progress(f"runnability: {device}: the default loading path failed; checking {backend} instead")
            result = run_plain_load(**attempt, backend=backend, bits=bits)
            progress(f"runnability: {device} ({backend}): {_outcome(result)}")
            results.append(result)
    return RunnabilityReport(model_dir=str(model_dir), reference=reference, results=tuple(results),
                             min_top1_agreement_pct=min_top1_agreement_pct)


def _outcome(result: RunnabilityResult) -> str:
    if result.ok:
        agreement = f", top-1 {result.top1_agreement_pct:.1f} %" if result.top1_agreement_pct is not None else ""
        return f"ok ({result.kernel}, {result.tokens} tokens{agreement}, {result.wall_s:.1f} s)"
    return f"FAILED ({result.failure_kind}): {result.explanation}"
