"""Small frozen records that steps hand to each other (paths and numbers, never models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


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


class SideMetrics(Record):
    """One side (fp16 baseline or GPTQ) measured by the one benchmark harness."""

    side: str  # fp16 | gptq
    device: str
    dtype: str
    kernel: str
    disk_bytes: int
    load_s: float
    memory_kind: str  # cuda_allocated | rss
    mem_after_load_bytes: int
    mem_peak_decode_bytes: int
    mem_peak_bytes: int
    decode_tok_s: float
    ttft_ms: float
    decode_mode: str = "eager"  # eager (HF generate) | cuda_graph
    perplexity: float | None
    ppl_tokens: int
    ppl_tokens_sha256: str
    sample_text: str


class BenchmarkResult(Record):
    fp16: SideMetrics
    gptq: SideMetrics
    path: str  # folder holding benchmark.json
    reused: bool = False
    duration_s: float = 0.0

    def ratios(self) -> dict[str, float | None]:
        """GPTQ relative to fp16: what the gate checks."""
        a, b = self.fp16, self.gptq
        return {
            "ppl_increase_pct": (
                (b.perplexity / a.perplexity - 1.0) * 100.0 if a.perplexity and b.perplexity else None
            ),
            "decode_speedup": b.decode_tok_s / a.decode_tok_s if a.decode_tok_s else None,
            "size_ratio": b.disk_bytes / a.disk_bytes if a.disk_bytes else None,
            "memory_ratio": (
                b.mem_after_load_bytes / a.mem_after_load_bytes if a.mem_after_load_bytes > 0 else None
            ),
        }


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
    """Where a passing artifact was published (one destination)."""

    uri: str  # file:///..., s3://bucket/prefix/..., or https://<hub>/<repo>/tree/<revision>
    manifest_sha256: str
    size_bytes: int
    reused: bool = False
    destination: Literal["file", "s3", "hub"] = "file"
    revision: str | None = None  # Hub branch / revision the files were pushed to
    commit: str | None = None  # Hub commit SHA of the upload


class RunOutcome(Record):
    """What a factory run returns (and what the CLI prints)."""

    run_id: str
    status: str  # passed | rejected | failed
    artifact_uri: str | None = None
    gate: str | None = None
    ratios: dict[str, float | None] = {}
    error: str | None = None
