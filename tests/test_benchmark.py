"""Step 4, benchmark, around its worker processes: what is committed for reuse, and what is reused.

The workers (one per side, :func:`tasks.benchmark.measure_side`) are replaced by canned side
metrics; the tiny model's real measurement runs in tests/test_flow.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tasks.benchmark as step
from modelfactory.core.errors import BenchmarkError
from modelfactory.core.records import ModelArtifact, SideMetrics
from modelfactory.core.specs import BenchmarkSpec
from modelfactory.testing.env import own_work_dir

SAME = "a" * 64
OTHER = "b" * 64


def _side(side: str, digest: str) -> dict:
    return SideMetrics(
        side=side, device="cpu", dtype="bfloat16", kernel="dense" if side == "fp16" else "TorchLinear",
        disk_bytes=1000 if side == "fp16" else 400, load_s=0.1, memory_kind="rss", mem_after_load_bytes=10,
        mem_peak_decode_bytes=12, mem_peak_bytes=13, decode_tok_s=50.0, ttft_ms=5.0, perplexity=12.0,
        ppl_tokens=128, ppl_tokens_sha256=digest, sample_text="text",
    ).model_dump(mode="json")


class Workers:
    """Stands in for the side workers: ``digests[side]`` is the token digest each side reports."""

    def __init__(self) -> None:
        self.digests = {"fp16": SAME, "gptq": SAME}
        self.calls: list[str] = []

    def __call__(self, target: str, *, kwargs: dict, **_) -> dict:
        assert target == "tasks.benchmark:measure_side"
        self.calls.append(kwargs["side"])
        return _side(kwargs["side"], self.digests[kwargs["side"]])


@pytest.fixture
def workers(monkeypatch, tmp_path) -> Workers:
    fake = Workers()
    monkeypatch.setattr(step, "run_isolated", fake)
    with own_work_dir(tmp_path / "work"):
        yield fake


def _run(tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return step.benchmark_models(
        baseline=ModelArtifact(path=str(model), sha="fp16-sha", source_uri=str(model), kind="merged"),
        candidate=ModelArtifact(path=str(model), sha="gptq-sha", source_uri=str(model), kind="gptq"),
        spec=BenchmarkSpec())


def _committed(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "work" / "benchmark").glob("*/_COMPLETE.json"))


def test_sides_that_scored_different_tokens_are_not_committed(workers, tmp_path):
    workers.digests["gptq"] = OTHER
    with pytest.raises(BenchmarkError, match="scored different tokens"):
        _run(tmp_path)
    assert _committed(tmp_path) == []  # nothing a later run could reuse
    workers.digests["gptq"] = SAME  # e.g. the tokenizer fixed: measured again, not reused
    result = _run(tmp_path)
    assert not result.reused and workers.calls == ["fp16", "gptq"] * 2
    assert len(_committed(tmp_path)) == 1


def test_valid_stored_benchmark_is_reused(workers, tmp_path):
    first = _run(tmp_path)
    again = _run(tmp_path)
    assert again.reused and workers.calls == ["fp16", "gptq"]
    assert (again.fp16, again.gptq, again.path) == (first.fp16, first.gptq, first.path)


@pytest.mark.parametrize("damage", ["different_tokens", "not_json", "bad_record"])
def test_invalid_stored_benchmark_is_measured_again(workers, tmp_path, damage):
    """A stored benchmark that would fail the checks of a fresh one (e.g. committed by a version
    that checked the token digests only after committing) is not reused: it is replaced."""
    first = _run(tmp_path)
    stored = Path(first.path) / "benchmark.json"
    data = json.loads(stored.read_text())
    if damage == "different_tokens":
        data["gptq"]["ppl_tokens_sha256"] = OTHER
        stored.write_text(json.dumps(data))
    elif damage == "not_json":
        stored.write_text("{")
    else:
        data["fp16"]["side"] = "int8"
        stored.write_text(json.dumps(data))
    again = _run(tmp_path)
    assert not again.reused and workers.calls == ["fp16", "gptq"] * 2
    assert again.gptq.ppl_tokens_sha256 == again.fp16.ppl_tokens_sha256 == SAME
    assert json.loads(stored.read_text())["gptq"]["ppl_tokens_sha256"] == SAME  # the bad one was replaced
    assert _run(tmp_path).reused and len(workers.calls) == 4  # and the new one is reused
