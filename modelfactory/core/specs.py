"""The factory's input: pydantic v2 specs (frozen, ``extra="forbid"``).

They are the flow's parameters, so Prefect renders them as the typed run form and validates
them before a run starts. ``FactorySpec.model_json_schema()`` is that form.

Canonical JSON of a spec (``canonical_json(spec)``) feeds the step keys, so every field that
changes an output must live here, and nothing that does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modelfactory.core.errors import SpecError
from modelfactory.core.ids import check_hub_repo_id, is_hub_repo_id

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
#: GPTQModel 7.6's dampening retry step for GPTQ (``_default_damp_auto_increment``), made the factory's explicit default.
DEFAULT_DAMP_AUTO_INCREMENT = 0.01


class Spec(BaseModel):
    """Base of every spec: immutable, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sources
SourceKind = Literal["hub", "local", "gguf", "s3"]


def classify_source(uri: str) -> SourceKind:
    """Tell a Hub repo id, a local folder, a ``.gguf`` file and an ``s3://`` prefix apart.

    Raises :class:`SpecError` for strings that are none of these (e.g. ``a/b/c`` that is not
    an existing path), so typos fail before any download starts.
    """
    if uri.startswith("s3://"):
        return "s3"
    if uri.startswith("hf://"):
        check_hub_repo_id(uri[len("hf://") :], what="the Hub repo of the model URI", fix="fix the model URI")
        return "hub"
    path = Path(uri).expanduser()
    if uri.lower().endswith(".gguf"):
        return "gguf"
    if path.is_absolute() or uri.startswith((".", "~")) or path.exists():
        return "local"
    if is_hub_repo_id(uri):
        return "hub"
    raise SpecError(
        f"model source {uri!r} is neither an existing local path, a .gguf file, an s3:// prefix "
        "nor a Hugging Face repo id 'owner/name': fix the URI (prefix Hub ids with hf:// to be explicit)"
    )


class ModelSource(Spec):
    """Where a base model comes from."""

    uri: Annotated[
        str,
        Field(
            min_length=1,
            description="Hub repo id ('owner/name' or 'hf://owner/name'), a local folder, "
            "a .gguf file (dequantized to fp16), or an s3:// prefix.",
        ),
    ]
    revision: str | None = Field(
        default=None, description="Hub branch, tag or commit; resolved to a commit SHA before download."
    )

    @field_validator("uri")
    @classmethod
    def _known_kind(cls, uri: str) -> str:
        classify_source(uri)
        return uri

    @property
    def kind(self) -> SourceKind:
        return classify_source(self.uri)

    @property
    def repo_id(self) -> str:
        return self.uri.removeprefix("hf://")


class AdapterSpec(Spec):
    """A peft LoRA adapter to merge into the base model."""

    uri: str = Field(min_length=1, description="Hub repo id or local folder holding adapter_config.json.")
    revision: str | None = Field(default=None, description="Hub revision of the adapter.")
    weight: float = Field(default=1.0, gt=0, le=10, description="Scale of this adapter's delta.")

    @field_validator("uri")
    @classmethod
    def _known_kind(cls, uri: str) -> str:
        if classify_source(uri) == "gguf":
            raise SpecError(f"adapter {uri!r} is a .gguf file: adapters must be peft folders or Hub repos")
        return uri


class MergeSpec(Spec):
    tolerance: float = Field(
        default=1e-3, gt=0, description="Max |merged - unmerged| logit difference (computed in fp32)."
    )
    verify_batch: int = Field(default=2, ge=1, le=16, description="Sequences in the equivalence check.")
    verify_tokens: int = Field(default=64, ge=4, le=2048, description="Tokens per verification sequence.")
    seed: int = 0


# --------------------------------------------------------------------------- text data
class TextSource(Spec):
    """Text for calibration or evaluation.

    Resolution order: ``path`` if given (a file, or a folder of ``*.txt``); else
    ``$MODELFACTORY_DATA_DIR/<config or dataset>/<split>.txt`` when that file exists; else
    ``datasets.load_dataset(dataset, config, split=split)[text_field]`` (needs the Hub).
    """

    path: str | None = Field(default=None, description="Local text file or folder of .txt files.")
    dataset: str = Field(default="wikitext", description="datasets name (used when no local copy).")
    config: str | None = Field(default="wikitext-2-raw-v1", description="datasets config name.")
    split: str = Field(default="test", description="datasets split.")
    text_field: str = "text"

    def label(self) -> str:
        return self.path or f"{self.dataset}/{self.config}:{self.split}"


def _calibration_text() -> TextSource:
    return TextSource(dataset="wikitext", config="wikitext-2-v1", split="validation")


class CalibrationSpec(Spec):
    text: TextSource = Field(default_factory=_calibration_text, description="Calibration text.")
    num_samples: int = Field(default=128, ge=1, le=4096, description="Calibration sequences.")
    seq_len: int = Field(default=512, ge=16, le=32768, description="Tokens per calibration sequence.")
    seed: int = 0


class QuantSpec(Spec):
    """GPTQ settings (GPTQModel ``QuantizeConfig``)."""

    bits: int = Field(default=4, description="Weight bits: 2, 3, 4 or 8.",
                      json_schema_extra={"enum": list(SUPPORTED_BITS)})
    group_size: int | Literal["auto"] = Field(
        default="auto",
        description="Columns per scale group (-1: one group per row). 'auto': the largest of 128, 64, 32 that "
        "divides every quantized layer's input width (read from the model's config.json when the quantize step "
        "runs), so the artifact loads with the default CPU and GPU kernels; the step records the size it used.",
        json_schema_extra={"enum": ["auto", *SUPPORTED_GROUP_SIZES]})
    damp_percent: float = Field(default=0.05, gt=0, lt=1, description="Hessian dampening.")
    desc_act: bool = Field(default=False, description="Quantize columns in activation order.")
    sym: bool = Field(default=True, description="Symmetric quantization.")
    true_sequential: bool = Field(default=True, description="Quantize sub-layers in order.")
    # GPTQModel's quality levers: each still writes a standard GPTQ checkpoint (docs/specs.md "Quality levers";
    # measured in docs/benchmarks.md). Combinations GPTQModel refuses or mis-handles: _levers_combine.
    act_group_aware: bool | Literal["auto"] = Field(
        default="auto",
        description="Act-group-aware reordering (GAR): quantize the columns within each group, and the groups, in "
        "order of activation importance, then store them back in the standard layout (unlike desc_act, no "
        "reordering at load, so no speed cost). auto: on unless desc_act or static_groups is (GPTQModel 7.6's "
        "default with desc_act; static groups would be computed for other columns than they quantize). true needs "
        "desc_act and static_groups off and a group size. A value equal to auto's choice is stored as auto.")
    static_groups: bool = Field(
        default=False,
        description="Compute every group's scale and zero from the unquantized weights before GPTQ's updates (else "
        "from the updated ones as GPTQ reaches the group); with desc_act the checkpoint's g_idx stays in column "
        "order. Needs a group size and act_group_aware off.")
    mse: float = Field(
        default=0.0, ge=0, le=8,
        description="Clipping search: per group, try shrinking the weight range (80 steps from 1.0 to 0.21 of it) "
        "and keep the scale that minimizes sum |w - q(w)|^mse (GPTQ's reference code uses 2.4). 0: off, the scale "
        "covers the full range.")
    gptaq: bool = Field(
        default=False,
        description="GPTAQ: each layer also corrects the drift between its quantized inputs and the full-precision "
        "model's (alpha 0.25, GPTAQ's recommended value); more calibration memory and time. With foem: FOEM + "
        "GPTAQ.")
    foem: bool = Field(
        default=False,
        description="FOEM: first-order error compensation on top of GPTQ's (beta 0.2, GPTQModel's default); with "
        "gptaq both (GPTQModel's FOEM alpha 0.25).")
    damp_auto_increment: float = Field(
        default=DEFAULT_DAMP_AUTO_INCREMENT, ge=0, lt=1,
        description="When a layer's Hessian does not factorize at damp_percent, retry with the dampening raised by "
        "this step (below 1); 0: no retry. Changes nothing for a layer that factorizes at once.")
    batch_size: int = Field(default=4, ge=1, le=256, description="Calibration forward batch size.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @field_validator("bits")
    @classmethod
    def _bits(cls, bits: int) -> int:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} is not supported by GPTQ: use one of {SUPPORTED_BITS}")
        return bits

    @field_validator("group_size")
    @classmethod
    def _group(cls, group: int | str) -> int | str:
        if group != "auto" and group not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size={group} is not supported: use 'auto' or one of {SUPPORTED_GROUP_SIZES}")
        return group

    @model_validator(mode="after")
    def _levers_combine(self) -> QuantSpec:
        """Refuse the lever combinations GPTQModel 7.6 refuses at quantize time, or quantizes wrongly without a
        word, before any work starts (``gptqmodel/quantization/config.py`` ``GPTQConfig``, ``quantization/gptq.py``)."""
        aga = self.act_group_aware
        if aga is True and self.desc_act:
            raise ValueError("act_group_aware: true requires desc_act: false (GPTQModel reorders columns one way or "
                             "the other): drop one of them, or set act_group_aware: auto (off with desc_act)")
        if aga is True and self.static_groups:
            raise ValueError("act_group_aware: true with static_groups: true quantizes every group with the scale of "
                             "another (GPTQModel 7.6 computes static groups before the act-group reordering): drop one "
                             "of them, or set act_group_aware: auto (off with static_groups)")
        if self.group_size == -1 and (aga is True or self.static_groups):
            raise ValueError(f"{'act_group_aware: true' if aga is True else 'static_groups: true'} needs groups but "
                             "group_size is -1: give a group size (e.g. 128 or auto)")
        if self.damp_auto_increment and self.damp_percent + self.damp_auto_increment >= 1:
            raise ValueError(f"damp_percent {self.damp_percent:g} + damp_auto_increment {self.damp_auto_increment:g} "
                             ">= 1: dampening must stay below 1, so no retry could run; lower damp_auto_increment "
                             "(e.g. 0.01) or set it to 0 for no retry")
        if aga != "auto" and aga == self._act_group_aware_by_default():
            # One configuration, one step key, one sweep member: the value auto chooses is stored as auto
            # (frozen: set during validation, as a frozen dataclass's __post_init__ would).
            object.__setattr__(self, "act_group_aware", "auto")
        return self

    @property
    def act_group_aware_on(self) -> bool:
        """Whether act-group-aware reordering runs: ``act_group_aware`` with ``auto`` resolved (on unless
        ``desc_act`` or ``static_groups`` is, or there are no groups)."""
        if self.act_group_aware != "auto":
            return self.act_group_aware
        return self._act_group_aware_by_default()

    def _act_group_aware_by_default(self) -> bool:
        """What ``act_group_aware: auto`` means for this spec."""
        return not (self.desc_act or self.static_groups or self.group_size == -1)

    def resolved(self, group_size: int) -> QuantSpec:
        """This spec with ``group_size: auto`` replaced by *group_size* (the quantize step's choice;
        see ``modelfactory.tasks.quantize.resolve_group_size``). An explicit group size is kept as is."""
        if self.group_size != "auto":
            return self
        return type(self).model_validate({**self.model_dump(), "group_size": group_size})

    def label(self) -> str:
        """Branch-style name, e.g. ``gptq-4bit-128g``, ``gptq-4bit-32g-actorder`` or ``gptq-4bit-64g-mse2.4-gptaq``:
        a quality lever away from its default adds its suffix (:meth:`lever_suffixes`).

        Unresolved ``auto`` reads ``gptq-4bit-autog``: the size is known only once the quantize step
        has read the model's widths; name published things with ``spec.resolved(size).label()``.
        """
        group = "nogroup" if self.group_size == -1 else f"{self.group_size}g"
        return f"gptq-{self.bits}bit-{group}" + "".join(f"-{suffix}" for suffix in self.lever_suffixes())

    def lever_suffixes(self) -> list[str]:
        """The label's suffix of each lever set away from its default (``actorder`` first, as labels always had it).
        ``noaga``: act-group-aware reordering off where ``auto`` would have it on."""
        suffixes = {
            "actorder": self.desc_act,
            "static": self.static_groups,
            "noaga": self._act_group_aware_by_default() and not self.act_group_aware_on,
            f"mse{self.mse:g}": self.mse > 0,
            "gptaq": self.gptaq,
            "foem": self.foem,
            f"dampinc{self.damp_auto_increment:g}": self.damp_auto_increment != DEFAULT_DAMP_AUTO_INCREMENT,
        }
        return [suffix for suffix, away in suffixes.items() if away]


# --------------------------------------------------------------------------- benchmark
#: Decode throughput is measured at these batch sizes by default (issue 12: 1, 8 and 32).
DEFAULT_DECODE_BATCH_SIZES = (1, 8, 32)
#: The largest decode batch measured or gated (a static KV cache of this many sequences).
MAX_DECODE_BATCH = 256


def check_batch_sizes(sizes: tuple[int, ...], *, what: str) -> None:
    """Raise ``ValueError`` naming *what* unless every batch size is in 1..:data:`MAX_DECODE_BATCH`."""
    bad = [size for size in sizes if not 1 <= size <= MAX_DECODE_BATCH]
    if bad:
        raise ValueError(f"{what}: batch sizes must be between 1 and {MAX_DECODE_BATCH}, got {bad}")


class PerplexitySpec(Spec):
    text: TextSource = Field(default_factory=TextSource, description="Evaluation text (WikiText-2 test).")
    context_len: int = Field(default=512, ge=16, le=32768, description="Tokens per window.")
    stride: int = Field(default=512, ge=1, le=32768, description="Window step; < context_len overlaps.")
    max_tokens: int | None = Field(
        default=16384, ge=32, description="Score at most this many tokens from the start (None: all)."
    )

    @model_validator(mode="after")
    def _stride_le_context(self) -> PerplexitySpec:
        if self.stride > self.context_len:
            raise ValueError(f"stride={self.stride} > context_len={self.context_len}: tokens would be skipped")
        return self


class DecodeSpec(Spec):
    mode: Literal["auto", "eager", "cuda_graph"] = Field(
        default="auto",
        description="auto: a CUDA graph of the static-cache decode step on CUDA, HF generate (eager) on CPU.",
    )
    graph_treatment: Literal["graph", "fused_graph", "compiled_graph", "fused_compiled_graph"] = Field(
        default="fused_compiled_graph",
        description="cuda_graph only, same for both sides: fuse q/k/v and gate/up, torch.compile the step, "
        "or both, before capturing the graph (checked against the eager model; falls back to graph).",
    )
    prompt: str = "The history of the city began"
    new_tokens: int = Field(default=64, ge=2, le=4096, description="Greedy tokens per timed generation.")
    warmup: int = Field(default=1, ge=0, le=10, description="Untimed generations first.")
    repeats: int = Field(default=3, ge=1, le=20, description="Timed generations (median is reported).")
    batch_sizes: tuple[int, ...] = Field(
        default=DEFAULT_DECODE_BATCH_SIZES, min_length=1,
        description="Decode throughput at each batch size (the prompt repeated; tok/s counts every sequence's "
        "tokens): ascending, without repeats, from 1 (batch 1 is decode_tok_s) up to "
        f"{MAX_DECODE_BATCH}.",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        check_batch_sizes(sizes, what="benchmark.decode.batch_sizes")
        if list(sizes) != sorted(set(sizes)):
            raise ValueError(f"batch_sizes={list(sizes)} must be ascending without repeats, e.g. "
                             f"{sorted(set(sizes))}")
        if sizes[0] != 1:
            raise ValueError(f"batch_sizes={list(sizes)} lacks 1: batch 1 is always measured (it is decode_tok_s, "
                             f"ttft and the gate's min_decode_speedup); start the list with 1")
        return sizes


#: Default number of fp16 top-k log-probs stored per position for the KL divergence
#: (``modelfactory.benchmark.agreement.DEFAULT_TOP_K``: the measured bound's gap; docs/benchmarks.md).
#: Kept equal to it by a test: core cannot import the benchmark layer.
DEFAULT_AGREEMENT_TOP_K = 256


class AgreementSpec(Spec):
    """KL(fp16 || GPTQ) and top-1 agreement on the perplexity windows (llama.cpp's way of judging a quantization)."""

    enabled: bool = Field(default=True, description="Measure distribution agreement with the fp16 side.")
    top_k: int = Field(
        default=DEFAULT_AGREEMENT_TOP_K, ge=1, le=65536,
        description="fp16 log-probs stored per position (plus the residual mass): the KL is a lower bound of the "
        "full-vocabulary KL, tighter as top_k grows (docs/benchmarks.md).",
    )


class TaskEvalSpec(Spec):
    """lm-evaluation-harness tasks, both sides through lm-eval's HF wrapper (opt-in: no tasks by default)."""

    names: tuple[str, ...] = Field(
        default=(), description="lm-eval task names, e.g. ['piqa_local'] (local PIQA validation) or Hub tasks "
        "like 'piqa' (need the Hub or a filled datasets cache). Empty: no task evaluation.",
    )
    limit: int | None = Field(default=None, ge=1, description="First N documents per task (None: all).")
    batch_size: int = Field(default=8, ge=1, le=512, description="lm-eval batch size.")

    @field_validator("names")
    @classmethod
    def _unique(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tasks listed twice: {repeated}")
        return names


class RunnabilitySpec(Spec):
    """After quantization: load the artifact with plain transformers (default settings) and generate, in a
    ``python -I`` process that imports no factory code, and check that it computes what the benchmark's own
    loading path computes (``modelfactory.benchmark.runnability``; docs/runnability.md)."""

    enabled: bool = Field(default=True, description="Check that the artifact runs in plain transformers.")
    devices: Literal["auto"] | tuple[Literal["cpu", "cuda"], ...] = Field(
        default="auto", description="auto: CPU always, plus CUDA when a GPU is visible.")
    new_tokens: int = Field(default=4, ge=1, le=256, description="Greedy tokens the user's snippet generates.")
    check_tokens: int = Field(
        default=48, ge=8, le=1024,
        description="Greedy tokens of the factory's reference continuation, scored teacher-forced by every plain "
        "load (its argmax at each position against the reference's).")
    min_top1_agreement_pct: float = Field(
        default=90.0, ge=0, le=100,
        description="A plain load works when its teacher-forced argmax agrees with the reference's on at least this "
        "share of the positions (and its logits are finite); garbage agrees on few.")
    near_tie_nats: float = Field(
        default=0.25, ge=0, le=5,
        description="At a position where the reference rates another token within this many nats (log-prob) of its "
        "most likely one, either counts as agreeing: kernels and dtypes (Marlin in fp16 on a GPU, int4pack in bf16 "
        "on a CPU) differ in the last bits, so a near-tie may flip.")
    timeout_s: float = Field(default=600.0, gt=0, le=7200,
                             description="Per device (a first CUDA load may compile kernels for minutes).")


class BenchmarkSpec(Spec):
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when present.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Compute dtype. auto: float16 on cuda; on cpu bfloat16 where the CPU has native "
        "bf16 instructions (AVX512-BF16, AMX, Arm BF16), else float32 (setting MODELFACTORY_CPU_DTYPE)."
    )
    kernel: str = Field(default="auto", description="GPTQModel backend (auto, gptq_marlin, gptq_torch, ...).")
    perplexity: PerplexitySpec = Field(default_factory=PerplexitySpec)
    decode: DecodeSpec = Field(default_factory=DecodeSpec)
    agreement: AgreementSpec = Field(default_factory=AgreementSpec)
    tasks: TaskEvalSpec = Field(default_factory=TaskEvalSpec)
    runnability: RunnabilitySpec = Field(
        default_factory=RunnabilitySpec,
        description="The plain-transformers check of the quantized artifact (its own step, right after quantize).")
    reuse: bool = Field(default=True, description="Reuse a finished benchmark with identical inputs.")

    #: Fields that change only the GPTQ side's measurement (or none): left out of the fp16 side's key,
    #: so every configuration of one merged model shares its fp16 measurement. A new field that the
    #: fp16 side does not depend on belongs here. ``agreement`` is not: the fp16 side writes the
    #: reference top-k log-probs in its own step folder.
    NOT_BASELINE_FIELDS: ClassVar[frozenset[str]] = frozenset({"kernel", "reuse", "runnability"})
    #: Fields that change no benchmark measurement at all (left out of the GPTQ side's key too):
    #: the runnability check is a step of its own with its own key.
    NOT_MEASUREMENT_FIELDS: ClassVar[frozenset[str]] = frozenset({"reuse", "runnability"})

    def baseline_inputs(self) -> dict[str, Any]:
        """The settings the fp16 side's measurement depends on (its step key's spec part)."""
        return self.model_dump(mode="json", exclude=set(self.NOT_BASELINE_FIELDS))

    def candidate_inputs(self) -> dict[str, Any]:
        """The settings the GPTQ side's measurement depends on (its step key's spec part)."""
        return self.model_dump(mode="json", exclude=set(self.NOT_MEASUREMENT_FIELDS))


# --------------------------------------------------------------------------- gate / publish
#: Which thresholds fill the ones a spec leaves unset: the default gate, or none.
GatePreset = Literal["default", "none"]

#: The default gate: what a spec without thresholds is held to (``gate.preset: default``). It rejects a
#: collapsed quantization and passes a healthy 4-bit one; it checks nothing a host changes (no speed, no
#: memory). The numbers and where they come from: docs/runnability.md "The default gate" (measured on
#: SmolLM2-135M, the hardest case a 4-bit build of a real model is: the smaller the model, the more 4 bits
#: cost; bench/results/smollm2-135m-default-gate-cpu.json).
DEFAULT_GATE: dict[str, float] = {
    "max_ppl_increase_pct": 60.0,
    "max_kld_mean": 0.45,
    "min_top1_agreement_pct": 65.0,
}
#: The default gate's thresholds that need ``benchmark.agreement`` (KL and top-1): not filled in when it is off.
AGREEMENT_THRESHOLDS = ("max_kld_mean", "max_kld_p99", "min_top1_agreement_pct")


class GateSpec(Spec):
    """Per-metric thresholds. A threshold left unset takes the preset's value (``preset: default``: the default
    gate, :data:`DEFAULT_GATE`), or is not checked (``preset: none``); :meth:`in_effect` resolves them."""

    preset: GatePreset = Field(
        default="default",
        description="default: every threshold not set here takes the default gate's value (max_ppl_increase_pct "
        f"{DEFAULT_GATE['max_ppl_increase_pct']:g}, max_kld_mean {DEFAULT_GATE['max_kld_mean']:g}, "
        f"min_top1_agreement_pct {DEFAULT_GATE['min_top1_agreement_pct']:g}, plus require_runnable: rejects a "
        "collapsed quantization, passes a healthy 4-bit one; docs/runnability.md). none: only the thresholds set "
        "here are checked.")

    max_ppl_increase_pct: float | None = Field(
        default=None, ge=0, description="Max perplexity increase of GPTQ over fp16, in percent."
    )
    min_decode_speedup: float | None = Field(
        default=None, gt=0, description="Min decode tok/s ratio GPTQ / fp16 at batch 1."
    )
    min_decode_speedup_by_batch: dict[int, float] | None = Field(
        default=None,
        description="Min decode tok/s ratio GPTQ / fp16 per batch size, e.g. {8: 1.0, 32: 0.9}; a batch size "
        "not in benchmark.decode.batch_sizes fails as not measured.",
    )
    max_size_ratio: float | None = Field(default=None, gt=0, description="Max disk size ratio GPTQ / fp16.")
    max_memory_ratio: float | None = Field(
        default=None, gt=0, description="Max memory-after-load ratio GPTQ / fp16."
    )
    max_kld_mean: float | None = Field(
        default=None, ge=0, description="Max mean per-token KL(fp16 || GPTQ) in nats (benchmark.agreement).")
    max_kld_p99: float | None = Field(
        default=None, ge=0, description="Max 99th percentile of the per-token KL(fp16 || GPTQ) in nats.")
    min_top1_agreement_pct: float | None = Field(
        default=None, ge=0, le=100, description="Min % of positions where GPTQ's top token is fp16's.")
    min_task_recovery_pct: float | dict[str, float] | None = Field(
        default=None,
        description="Min task score recovery GPTQ / fp16 in % (acc_norm when the task has it, else acc): one "
        "number for every task of benchmark.tasks, or {task: pct}; a task not evaluated fails as not measured.",
    )
    require_runnable: bool = Field(
        default=True,
        description="Fail when the artifact does not run correctly in plain transformers on a device it was checked "
        "on: no standard loading path works there, or one computes something else than the measured model "
        "(benchmark.runnability; not checked when that is disabled). A host that cannot run the check (offline, no "
        "toolchain) does not fail it when another standard kernel ran there.",
    )
    require_default_path: bool = Field(
        default=False,
        description="Stricter: the library's default loading path (plain from_pretrained, no backend) must work on "
        "every device checked, whatever the reason it does not (e.g. GPTQModel's Hopper kernel needs network "
        "access at first use).",
    )

    def in_effect(self, *, agreement: bool = True) -> GateSpec:
        """The thresholds this gate checks: the ones set here, the rest from the preset (with *agreement* off,
        the preset's KL and top-1 thresholds are not filled in: nothing would measure them). ``preset`` of the
        result is ``none``: it is explicit."""
        filled = {} if self.preset == "none" else {
            field: value for field, value in DEFAULT_GATE.items()
            if getattr(self, field) is None and (agreement or field not in AGREEMENT_THRESHOLDS)}
        return self.model_copy(update={**filled, "preset": "none"})

    def describe(self) -> str:
        """One line naming every check in effect (a run prints it)."""
        values = self.model_dump(exclude={"preset"}, exclude_none=True)
        checks = [f"{name}={value}" for name, value in values.items() if not isinstance(value, bool)]
        checks += [name for name, value in values.items() if value is True]
        return ", ".join(checks) or "nothing"

    @field_validator("min_decode_speedup_by_batch")
    @classmethod
    def _speedups_by_batch(cls, minimums: dict[int, float] | None) -> dict[int, float] | None:
        if minimums is None:
            return None
        if not minimums:
            raise ValueError("min_decode_speedup_by_batch is empty: give {batch size: minimum speed-up} or leave it out")
        check_batch_sizes(tuple(minimums), what="gate.min_decode_speedup_by_batch")
        bad = {batch: value for batch, value in minimums.items() if not value > 0}
        if bad:
            raise ValueError(f"min_decode_speedup_by_batch: minimum speed-ups must be > 0, got {bad}")
        return dict(sorted(minimums.items()))

    @field_validator("min_task_recovery_pct")
    @classmethod
    def _task_recovery(cls, minimum: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = minimum.values() if isinstance(minimum, dict) else [] if minimum is None else [minimum]
        if isinstance(minimum, dict) and not minimum:
            raise ValueError("min_task_recovery_pct is empty: give {task: minimum %}, one number, or leave it out")
        bad = [v for v in values if not 0 <= v <= 1000]
        if bad:
            raise ValueError(f"min_task_recovery_pct: minimums are percentages between 0 and 1000, got {bad}")
        return minimum


class PublishSpec(Spec):
    destination: str | None = Field(
        default=None,
        description="Where a passing model goes: file:///folder, s3://bucket/prefix, or hf://owner/repo "
        "(Hugging Face Hub). Default: MODELFACTORY_STORE_URL.",
    )
    private: bool = Field(default=False, description="Hub only: create the repo private.")
    revision: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$",
        description="Hub only: branch to push to (default: the quantization label, e.g. gptq-4bit-128g).",
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$",
        description="Artifact name (default: derived from the base model).",
    )


class FactorySpec(Spec):
    """Everything one factory run needs."""

    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", description="Run label.")
    base: ModelSource
    adapters: tuple[AdapterSpec, ...] = Field(default=(), description="LoRA adapters merged in order.")
    merge: MergeSpec = Field(default_factory=MergeSpec)
    quantize: QuantSpec = Field(default_factory=QuantSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)
    trust_remote_code: bool = Field(default=False, description="Allow models that ship Python code.")

    def gate_in_effect(self) -> GateSpec:
        """The gate this run is held to: the spec's thresholds, the rest from its preset, the KL and top-1 ones
        only where ``benchmark.agreement`` measures them (:meth:`GateSpec.in_effect`)."""
        return self.gate.in_effect(agreement=self.benchmark.agreement.enabled)

    @model_validator(mode="after")
    def _gate_measures_what_it_checks(self) -> FactorySpec:
        """A threshold whose metric this spec never measures is a mistake to catch before any heavy work."""
        gate, bench = self.gate, self.benchmark
        if not bench.agreement.enabled:
            unmeasured = [f for f in AGREEMENT_THRESHOLDS if getattr(gate, f) is not None]
            if unmeasured:
                raise ValueError(f"gate.{', gate.'.join(unmeasured)} set but benchmark.agreement.enabled is false: "
                                 "enable the agreement measurement or drop the threshold")
        minimum = gate.min_task_recovery_pct
        if minimum is not None and not bench.tasks.names:
            raise ValueError("gate.min_task_recovery_pct set but benchmark.tasks.names is empty: list the lm-eval "
                             "tasks to evaluate (e.g. ['piqa_local']) or drop the threshold")
        if isinstance(minimum, dict) and (extra := sorted(set(minimum) - set(bench.tasks.names))):
            raise ValueError(f"gate.min_task_recovery_pct names tasks not in benchmark.tasks.names "
                             f"{list(bench.tasks.names)}: {extra}")
        return self


# --------------------------------------------------------------------------- loading
SpecT = TypeVar("SpecT", bound=Spec)


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {where}: {err['msg']} (got {shown})")
    return f"invalid spec in {origin}:\n" + "\n".join(lines) + "\nfix these fields and run again"


def validate_spec(model: type[SpecT], data: dict[str, Any], *, origin: str = "spec") -> SpecT:
    """Validate a dict into *model* (a factory or sweep spec), raising :class:`SpecError` with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, origin)) from exc


def parse_spec(data: dict[str, Any], *, origin: str = "spec") -> FactorySpec:
    """Validate a dict into a :class:`FactorySpec`, raising :class:`SpecError` with every problem."""
    return validate_spec(FactorySpec, data, origin=origin)


def load_spec(path: str | Path) -> FactorySpec:
    """Read a YAML or JSON spec file."""
    return parse_spec(read_spec_file(path), origin=str(path))


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON spec file (not validated), or :class:`SpecError` saying what is wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise SpecError(f"spec file {str(path)!r} does not exist: pass an existing YAML/JSON file") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"spec file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}): "
            f"save it as UTF-8 YAML/JSON"
        ) from exc
    except IsADirectoryError as exc:
        raise SpecError(f"spec path {str(path)!r} is a folder: pass a YAML/JSON file") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping at the top, got {type(data).__name__}")
    return data


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge *overrides* (e.g. CLI flags, ``None`` = not given) into *base*."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        elif isinstance(value, dict):
            merged[key] = merge_overrides({}, value)
        else:
            merged[key] = value
    return merged
