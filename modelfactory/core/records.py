"""Small frozen records that steps hand to each other (paths and numbers, never models)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from modelfactory.core.specs import QuantSpec


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelArtifact(Record):
    """A model folder on disk (safetensors + config + tokenizer)."""

    path: str
    #: Commit SHA for Hub sources, sha256 content hash for files/folders, step key for outputs.
    sha: str
    source_uri: str
    kind: str  # hub | local | gguf | merged | gptq
    reused: bool = False
    duration_s: float = 0.0


class AdapterArtifact(Record):
    path: str
    sha: str
    source_uri: str
    weight: float


class MergeResult(Record):
    base: ModelArtifact
    model: ModelArtifact  # the merged model (the base itself when there are no adapters)
    adapters: tuple[AdapterArtifact, ...]
    #: Max |merged - unmerged| logit over the verification batch (None: no adapters).
    max_abs_logit_diff: float | None
    tolerance: float


class QuantResult(Record):
    model: ModelArtifact
    quantize_s: float
    engine: str  # e.g. "gptqmodel 7.6.0"
    device: str
    #: The group size the model was quantized with (``group_size: auto`` resolved; None: not recorded).
    group_size: int | None = None

    def spec_label(self, spec: QuantSpec) -> str:
        """The label of what was built: *spec* with the group size this quantization resolved."""
        return spec.resolved(self.group_size).label() if self.group_size is not None else spec.label()


#: The two sides of a benchmark: the fp16 baseline and the GPTQ candidate.
Side = Literal["fp16", "gptq"]
#: What the memory numbers count: CUDA caching-allocator bytes, or the process RSS on CPU.
MemoryKind = Literal["cuda_allocated", "rss"]
#: How the decode was timed: HF ``generate`` (eager), or a CUDA graph of the decode step prepared
#: by one treatment (``cuda_graph:<treatment>``, see ``modelfactory.benchmark.graph``). Bare
#: ``cuda_graph`` is what results written before treatments existed hold.
RecordedDecodeMode = Literal[
    "eager",
    "cuda_graph",
    "cuda_graph:graph",
    "cuda_graph:fused_graph",
    "cuda_graph:compiled_graph",
    "cuda_graph:fused_compiled_graph",
    "cuda_graph:fused_compiled_graph_atomics",
]


class TaskMetrics(Record):
    """One lm-eval task on one side: accuracy and length-normalized accuracy with their stderr
    (``None`` where the task does not report a metric)."""

    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    n_docs: int | None = None

    @property
    def primary(self) -> tuple[str, float | None]:
        """``("acc_norm", value)`` when the task reports it, else ``("acc", value)``: the score recovery uses."""
        return ("acc_norm", self.acc_norm) if self.acc_norm is not None else ("acc", self.acc)


class SideMetrics(Record):
    """One side (fp16 baseline or GPTQ) measured by the one benchmark harness."""

    side: Side
    device: str
    dtype: str
    kernel: str
    disk_bytes: int
    load_s: float
    #: torch.compile's share of the decode measurement (every batch size's warm-up), seconds; with ``load_s``
    #: (a first GPTQ load JIT-compiles its kernel) what the persistent compile caches save on a warm host.
    #: None in records written before it was recorded.
    compile_s: float | None = None
    memory_kind: MemoryKind
    mem_after_load_bytes: int
    mem_peak_decode_bytes: int
    mem_peak_bytes: int
    decode_tok_s: float | None  # at batch 1; None: not measured (the decode interval was not positive)
    ttft_ms: float
    decode_mode: RecordedDecodeMode = "eager"
    perplexity: float | None
    ppl_tokens: int
    ppl_tokens_sha256: str
    sample_text: str
    #: Decode tok/s (every sequence's tokens) per batch size of ``benchmark.decode.batch_sizes``;
    #: empty in records written before batch sizes existed (:meth:`decode_rate` then knows batch 1).
    decode_tok_s_by_batch: dict[int, float] = {}
    #: lm-eval scores per task of ``benchmark.tasks`` (empty when none were evaluated, and in older records).
    tasks: dict[str, TaskMetrics] = {}
    #: lm-eval's version and the document limit the task scores were measured with.
    tasks_lm_eval_version: str | None = None
    tasks_limit: int | None = None

    def decode_rate(self, batch: int) -> float | None:
        """Decode tok/s at *batch* sequences, ``None`` when that batch size was not measured (or its timing
        interval was not positive)."""
        if batch in self.decode_tok_s_by_batch:
            return self.decode_tok_s_by_batch[batch]
        return self.decode_tok_s if batch == 1 else None


def decode_speedup_name(batch: int) -> str:
    """The ratio (and gate metric) name of the decode speed-up at *batch*: batch 1 keeps its old name."""
    return "decode_speedup" if batch == 1 else f"decode_speedup_b{batch}"


class BaselineResult(Record):
    """The fp16 side of a benchmark, measured once per merged model, settings and host, and shared by
    every quantized configuration of that model (:func:`modelfactory.tasks.benchmark.benchmark_baseline`)."""

    model_sha: str  # the merged model measured (its ModelArtifact.sha)
    metrics: SideMetrics
    #: The merged model itself: the GPTQ side loads it next to itself for the exact KL, and the fp16
    #: side is measured again from it when the two sides' decode treatments must be made the same.
    #: None in records written before.
    model: ModelArtifact | None = None
    key: str  # its step key: every candidate checks it was measured with the settings it uses
    path: str  # the step folder holding fp16.json and the side's per-window outputs
    reused: bool = False
    duration_s: float = 0.0


#: How a KL divergence was computed: over the full vocabulary with both models in one process, or over the
#: fp16 top-k tokens plus one residual bucket (a lower bound of the full KL: reported, never gated).
KldMethod = Literal["exact", "topk_lower_bound"]


class AgreementMetrics(Record):
    """The GPTQ side's next-token distributions against the fp16 side's, over every perplexity position
    (``modelfactory.benchmark.agreement`` computes it and writes it as the step's ``agreement.json``)."""

    positions: int
    top_k: int
    vocab_size: int
    #: How the KL values below were computed (records written before the exact method: the top-k bound,
    #: exact only when top_k covered the vocabulary).
    kld_method: KldMethod
    #: KL(fp16 || GPTQ) in nats per token.
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    #: % of positions where the GPTQ argmax is the fp16 argmax (lowest id among tied maxima on both sides).
    top1_agreement_pct: float
    #: Mean fp16 probability mass outside the stored top-k (the slack of the lower bound scales with it).
    rest_mass_mean: float
    #: An exact record also carries the top-k lower bound of the same run (reported, never gated).
    lower_bound_kld_mean: float | None = None
    lower_bound_kld_p99: float | None = None
    #: The GPTQ kernel whose logits these are (the benchmark's; None in older records).
    kernel: str | None = None
    #: Why the KL is only a lower bound (e.g. the fp16 model did not fit next to the GPTQ one).
    kld_method_note: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _method_of_older_records(cls, data: object) -> object:
        """Records written before ``kld_method`` existed held a top-k bound (exact when top_k covered the
        vocabulary) and a derived ``kld_is_lower_bound`` flag, which the method replaces."""
        if isinstance(data, dict) and "kld_method" not in data and {"top_k", "vocab_size"} <= data.keys():
            data = {k: v for k, v in data.items() if k != "kld_is_lower_bound"}
            data["kld_method"] = "exact" if data["top_k"] >= data["vocab_size"] else "topk_lower_bound"
        return data

    @property
    def kld_is_lower_bound(self) -> bool:
        return self.kld_method != "exact"


def task_recovery_name(task: str) -> str:
    """The ratio (and catalog metric) name of one task's score recovery."""
    return f"task_recovery_pct_{task}"


class BenchmarkResult(Record):
    fp16: SideMetrics
    gptq: SideMetrics
    path: str  # folder holding benchmark.json
    reused: bool = False  # the GPTQ side (and so the whole result) came from a finished benchmark
    duration_s: float = 0.0
    #: The fp16 side's own step folder (BaselineResult.path), and whether it was reused there
    #: (``None``/``False`` in results written before the fp16 side was a step of its own).
    baseline_path: str | None = None
    baseline_reused: bool = False
    #: KL divergence / top-1 agreement with fp16 (``None``: not measured, or a result written before it existed).
    agreement: AgreementMetrics | None = None

    def task_recovery(self, task: str) -> float | None:
        """GPTQ / fp16 score of *task* in %, on acc_norm when both sides report it, else on acc
        (lm-eval's length-normalized accuracy is the score peers compare on multiple-choice tasks
        such as PIQA, where answers differ in length); ``None`` unless both sides measured it."""
        a, b = self.fp16.tasks.get(task), self.gptq.tasks.get(task)
        if a is None or b is None:
            return None
        if a.acc_norm is not None and b.acc_norm is not None:
            base, quant = a.acc_norm, b.acc_norm
        else:
            base, quant = a.acc, b.acc
        return quant / base * 100.0 if base and quant is not None else None

    def decode_speedup(self, batch: int) -> float | None:
        """GPTQ / fp16 decode tok/s at *batch*, ``None`` unless both sides measured it the same way (one
        decode mode and treatment: a speed-up between two treatments compares unlike things)."""
        if self.fp16.decode_mode != self.gptq.decode_mode:
            return None
        a, b = self.fp16.decode_rate(batch), self.gptq.decode_rate(batch)
        return b / a if a and b is not None else None

    def ratios(self) -> dict[str, float | None]:
        """GPTQ relative to fp16: what the gate checks (``decode_speedup_b<N>`` per batch size N > 1).

        With agreement measured: ``kld_mean``, ``kld_p99``, ``top1_agreement_pct``. With tasks:
        ``task_recovery_pct_<task>`` per task (:meth:`task_recovery`: acc_norm, else acc) and
        ``task_recovery_pct``, the smallest of them (``None`` if any task lacks a side).
        """
        a, b = self.fp16, self.gptq
        batches = sorted((set(a.decode_tok_s_by_batch) | set(b.decode_tok_s_by_batch)) - {1})
        tasks = sorted(set(a.tasks) | set(b.tasks))
        recoveries = {task_recovery_name(task): self.task_recovery(task) for task in tasks}
        agreement = {}
        if self.agreement is not None:
            agreement = {"kld_mean": self.agreement.kld_mean, "kld_p99": self.agreement.kld_p99,
                         "top1_agreement_pct": self.agreement.top1_agreement_pct}
        overall = {}
        if recoveries:
            values = list(recoveries.values())
            overall = {"task_recovery_pct": None if None in values else min(values)}
        return {
            "ppl_increase_pct": (
                (b.perplexity / a.perplexity - 1.0) * 100.0 if a.perplexity and b.perplexity else None
            ),
            "decode_speedup": self.decode_speedup(1),
            "size_ratio": b.disk_bytes / a.disk_bytes if a.disk_bytes else None,
            "memory_ratio": (
                b.mem_after_load_bytes / a.mem_after_load_bytes if a.mem_after_load_bytes > 0 else None
            ),
        } | {decode_speedup_name(batch): self.decode_speedup(batch) for batch in batches} | agreement | overall | recoveries


class GateCheck(Record):
    metric: str
    threshold: float
    baseline: float | None
    candidate: float | None
    observed: float | None
    passed: bool
    message: str


class GateDecision(Record):
    passed: bool
    checks: tuple[GateCheck, ...]

    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.passed:
            return f"passed ({len(self.checks)} checks)"
        return "rejected: " + "; ".join(c.message for c in self.failures())


class Publication(Record):
    """Where a passing artifact was published (one destination): what the publish step returns and what
    the catalog records and hands back (with when)."""

    uri: str  # file:///..., s3://bucket/prefix/..., or https://<hub>/<repo>/tree/<revision>
    manifest_sha256: str
    size_bytes: int
    reused: bool = False
    destination: Literal["file", "s3", "hub"] = "file"
    revision: str | None = None  # Hub branch / revision the files were pushed to
    commit: str | None = None  # Hub commit SHA of the upload
    #: The content digest of the published files (``modelfactory.core.manifest.content_digest``): the
    #: files the benchmark loaded (``None`` in records written before it was kept).
    content_sha256: str | None = None
    #: When the catalog recorded it (``None`` until then).
    published_at: datetime | None = None


class RunOutcome(Record):
    """What a factory run returns (and what the CLI prints)."""

    run_id: str
    status: str  # passed | rejected | failed
    artifact_uri: str | None = None
    gate: str | None = None
    ratios: dict[str, float | None] = {}
    error: str | None = None
