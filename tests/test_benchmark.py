"""Step 4, benchmark, around its worker processes: what is committed for reuse, and what is reused.

The workers (one per side, :func:`modelfactory.benchmark.sides.measure_side`) are replaced by canned side
metrics, except at the end: the tiny model, quantized twice, measured for real (batch sizes on
CPU, the fp16 side measured once for both configurations).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import modelfactory.tasks.benchmark as step
from modelfactory.benchmark.agreement import write_reference
from modelfactory.benchmark.perplexity import token_digest
from modelfactory.benchmark.sides import measure_side
from modelfactory.core.errors import BenchmarkError, SpecError
from modelfactory.core.isolation import run_isolated
from modelfactory.core.records import AgreementMetrics, ModelArtifact, SideMetrics
from modelfactory.core.specs import BenchmarkSpec, DecodeSpec, QuantSpec, parse_spec
from modelfactory.testing.env import own_work_dir

#: The scored tokens of the canned sides (their digest is what the fp16 side's agreement reference holds).
TARGETS = [3, 1, 4, 1, 5]
SAME = token_digest(TARGETS)
OTHER = "b" * 64
#: What a canned GPTQ worker reports against the reference.
CANNED_AGREEMENT = AgreementMetrics(positions=len(TARGETS), top_k=4, vocab_size=8, kld_mean=0.01, kld_median=0.005,
                                  kld_p99=0.09, kld_max=0.1, top1_agreement_pct=80.0, rest_mass_mean=0.02)


def _side(side: str, digest: str, load_s: float = 0.1, decode_mode: str = "eager") -> dict:
    return SideMetrics(decode_mode=decode_mode,
        side=side, device="cpu", dtype="bfloat16", kernel="dense" if side == "fp16" else "TorchLinear",
        disk_bytes=1000 if side == "fp16" else 400, load_s=load_s, memory_kind="rss", mem_after_load_bytes=10,
        mem_peak_decode_bytes=12, mem_peak_bytes=13, decode_tok_s=50.0, ttft_ms=5.0, perplexity=12.0,
        ppl_tokens=128, ppl_tokens_sha256=digest, sample_text="text", decode_tok_s_by_batch={1: 50.0, 8: 300.0},
    ).model_dump(mode="json")


class Workers:
    """Stands in for the side workers: ``digests[side]`` is the token digest each side reports,
    ``load_s`` what the fp16 side reports as its load time (to tell two fp16 measurements apart)."""

    def __init__(self) -> None:
        self.digests = {"fp16": SAME, "gptq": SAME}
        self.load_s = 0.1
        self.calls: list[str] = []
        self.kwargs: list[dict] = []
        #: Decode as on CUDA (a graph treatment per side) rather than eagerly as on CPU.
        self.cuda_graph = False
        #: Sides whose requested treatment fails its check (they fall back to the plain graph where allowed).
        self.failing_treatment: set[str] = set()

    def __call__(self, target, *, kwargs: dict, **_) -> dict:
        assert target is measure_side
        self.calls.append(kwargs["side"])
        self.kwargs.append(kwargs)
        self._agreement_outputs(kwargs)
        return _side(kwargs["side"], self.digests[kwargs["side"]],
                     load_s=self.load_s if kwargs["side"] == "fp16" else 0.1, decode_mode=self._mode(kwargs))

    def _mode(self, kwargs: dict) -> str:
        if not self.cuda_graph:
            return "eager"
        treatment = kwargs["treatment"] or "fused_compiled_graph"
        if kwargs["side"] in self.failing_treatment and treatment != "graph":
            assert kwargs["allow_fallback"], "a forced treatment that fails its check fails the side"
            treatment = "graph"
        return f"cuda_graph:{treatment}"


    @staticmethod
    def _agreement_outputs(kwargs: dict) -> None:
        """What a real worker leaves next to its record: the fp16 reference, or the GPTQ side's agreement."""
        out = Path(kwargs["out_dir"])
        if kwargs["side"] == "fp16":
            logits = torch.randn(len(TARGETS), 8, generator=torch.Generator().manual_seed(0))
            write_reference(out / step.REFERENCE_DIR, [(logits, torch.tensor(TARGETS))], top_k=4)
        else:
            (out / step.AGREEMENT_FILE).write_text(CANNED_AGREEMENT.model_dump_json())


@pytest.fixture
def workers(monkeypatch, tmp_path) -> Workers:
    fake = Workers()
    monkeypatch.setattr(step, "run_isolated", fake)
    with own_work_dir(tmp_path / "work"):
        yield fake


def _model(tmp_path: Path, sha: str, kind: str) -> ModelArtifact:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return ModelArtifact(path=str(model), sha=sha, source_uri=str(model), kind=kind)


def _run(tmp_path: Path, *, gptq_sha: str = "gptq-sha", spec: BenchmarkSpec | None = None):
    return step.benchmark_models(baseline=_model(tmp_path, "fp16-sha", "merged"),
                                 candidate=_model(tmp_path, gptq_sha, "gptq"), spec=spec or BenchmarkSpec())


def _committed(tmp_path: Path, step_name: str = "benchmark") -> list[Path]:
    return sorted((tmp_path / "work" / step_name).glob("*/_COMPLETE.json"))


def test_sides_that_scored_different_tokens_are_not_committed(workers, tmp_path):
    workers.digests["gptq"] = OTHER
    with pytest.raises(BenchmarkError, match="scored different tokens"):
        _run(tmp_path)
    assert _committed(tmp_path) == []  # nothing a later run could reuse
    workers.digests["gptq"] = SAME  # e.g. the tokenizer fixed: measured again, not reused
    result = _run(tmp_path)
    # the fp16 side was valid on its own: committed, and reused by the second attempt
    assert not result.reused and result.baseline_reused and workers.calls == ["fp16", "gptq", "gptq"]
    assert len(_committed(tmp_path)) == 1


def test_valid_stored_benchmark_is_reused(workers, tmp_path):
    first = _run(tmp_path)
    again = _run(tmp_path)
    assert again.reused and again.baseline_reused and workers.calls == ["fp16", "gptq"]
    assert (again.fp16, again.gptq, again.path, again.baseline_path) == (first.fp16, first.gptq, first.path,
                                                                         first.baseline_path)
    assert again.ratios() == first.ratios() and again.ratios()["decode_speedup_b8"] == 1.0


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
    assert not again.reused and again.baseline_reused and workers.calls == ["fp16", "gptq", "gptq"]
    assert again.gptq.ppl_tokens_sha256 == again.fp16.ppl_tokens_sha256 == SAME
    assert json.loads(stored.read_text())["gptq"]["ppl_tokens_sha256"] == SAME  # the bad one was replaced
    assert _run(tmp_path).reused and len(workers.calls) == 3  # and the new one is reused


# --------------------------------------------------------------------------- the shared fp16 side
def test_fp16_side_is_measured_once_for_every_configuration(workers, tmp_path):
    """Two quantized configurations of one merged model: the second measures only its GPTQ side."""
    first = _run(tmp_path, gptq_sha="gptq-g32")
    second = _run(tmp_path, gptq_sha="gptq-g64", spec=BenchmarkSpec(kernel="gptq_torch"))  # kernel: GPTQ side only
    assert workers.calls == ["fp16", "gptq", "gptq"]
    assert not first.baseline_reused and second.baseline_reused and not second.reused
    assert second.fp16 == first.fp16 and second.baseline_path == first.baseline_path
    assert second.path != first.path and len(_committed(tmp_path)) == 2
    assert len(_committed(tmp_path, "benchmark-fp16")) == 1
    baseline = Path(first.baseline_path)
    assert baseline.parent.name == "benchmark-fp16" and (baseline / "fp16.json").is_file()
    # each worker is told its side's output folder; the GPTQ side, where the fp16 side's outputs are
    fp16_call, *gptq_calls = workers.kwargs
    assert Path(fp16_call["out_dir"]).parent == baseline.parent and fp16_call["reference_dir"] is None
    assert [c["reference_dir"] for c in gptq_calls] == [str(baseline)] * 2
    assert [Path(c["out_dir"]).parent.name for c in gptq_calls] == ["benchmark"] * 2


def test_baseline_key_depends_only_on_what_changes_the_fp16_side():
    key = step.baseline_key(model_sha="m", spec=BenchmarkSpec())
    assert step.baseline_key(model_sha="m", spec=BenchmarkSpec(kernel="gptq_marlin", reuse=False)) == key
    for changed in ({"decode": {"batch_sizes": (1, 4)}}, {"decode": {"new_tokens": 8}},
                    {"perplexity": {"max_tokens": 1024}}, {"dtype": "float32"}):
        assert step.baseline_key(model_sha="m", spec=BenchmarkSpec.model_validate(changed)) != key, changed
    assert step.baseline_key(model_sha="other", spec=BenchmarkSpec()) != key


def test_baseline_key_names_the_dtype_this_host_computes_in(workers, tmp_path, set_env):
    """On a CPU ``dtype: auto`` is bfloat16 or float32 by the CPU's instructions: an fp16 side measured in
    one is not the baseline of a host that computes in the other."""
    spec = BenchmarkSpec(device="cpu")
    set_env(MODELFACTORY_CPU_DTYPE="bfloat16")
    native = step.baseline_key(model_sha="m", spec=spec)
    baseline = step.benchmark_baseline(model=_model(tmp_path, "fp16-sha", "merged"), spec=spec)
    set_env(MODELFACTORY_CPU_DTYPE="float32")
    assert step.baseline_key(model_sha="m", spec=spec) != native
    with pytest.raises(BenchmarkError, match="on another kind of host"):
        step.benchmark_candidate(baseline=baseline, candidate=_model(tmp_path, "gptq-sha", "gptq"), spec=spec)


def test_candidate_refuses_a_baseline_measured_with_other_settings(workers, tmp_path):
    baseline = step.benchmark_baseline(model=_model(tmp_path, "fp16-sha", "merged"), spec=BenchmarkSpec())
    other = BenchmarkSpec.model_validate({"decode": {"batch_sizes": (1, 4)}})
    with pytest.raises(BenchmarkError, match="measured with other benchmark settings"):
        step.benchmark_candidate(baseline=baseline, candidate=_model(tmp_path, "gptq-sha", "gptq"), spec=other)
    assert workers.calls == ["fp16"]
    with_kernel = BenchmarkSpec(kernel="gptq_torch")  # the same fp16 side
    result = step.benchmark_candidate(baseline=baseline, candidate=_model(tmp_path, "gptq-sha", "gptq"),
                                      spec=with_kernel)
    assert result.fp16 == baseline.metrics and result.baseline_path == baseline.path
    assert workers.calls == ["fp16", "gptq"]


@pytest.mark.parametrize("damage", ["not_json", "wrong_side"])
def test_invalid_stored_baseline_is_measured_again(workers, tmp_path, damage):
    first = _run(tmp_path)
    stored = Path(first.baseline_path) / "fp16.json"
    if damage == "not_json":
        stored.write_text("{")
    else:
        stored.write_text(stored.read_text().replace('"fp16"', '"gptq"'))
    again = _run(tmp_path)
    assert not again.baseline_reused and workers.calls == ["fp16", "gptq", "fp16"]
    assert again.reused  # the same fp16 measurement (canned): the stored GPTQ side still belongs to it
    assert json.loads(stored.read_text())["side"] == "fp16"


def test_benchmark_of_a_baseline_measured_again_is_not_reused(workers, tmp_path):
    """A stored result holds the fp16 side it was combined with: after the baseline was measured
    again (here with another load time), its GPTQ side is measured again too."""
    first = _run(tmp_path)
    workers.load_s = 0.2
    again = _run(tmp_path, spec=BenchmarkSpec(reuse=False))
    assert workers.calls == ["fp16", "gptq"] * 2 and not again.reused and not again.baseline_reused
    assert again.fp16.load_s == 0.2 and again.path == first.path  # replaced in place
    stored = json.loads((Path(again.path) / "benchmark.json").read_text())
    assert stored["fp16"]["load_s"] == 0.2
    (Path(again.baseline_path) / "_COMPLETE.json").unlink()  # the baseline measured again (0.3) ...
    workers.load_s = 0.3
    third = _run(tmp_path)
    assert workers.calls[4:] == ["fp16", "gptq"] and third.fp16.load_s == 0.3  # ... so its GPTQ side too


# --------------------------------------------------------------------------- the tiny model, for real
class CountingWorkers:
    """The real worker processes, counted by side."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, target, *, kwargs: dict, **rest) -> dict:
        self.calls.append(kwargs["side"])
        return run_isolated(target, kwargs=kwargs, **rest)


#: One untimed warm-up run: without it the timed 1-token run is the process's first generate (lazy
#: initialisation), can outlast the N-token run after it, and the rate is then rightly "not measured".
TINY_BENCH = {"device": "cpu", "perplexity": {"context_len": 128, "stride": 128, "max_tokens": 256},
              "decode": {"new_tokens": 8, "warmup": 1, "repeats": 1, "batch_sizes": (1, 4)}}


def test_tiny_model_two_configurations_one_fp16_side_batch_sizes(tiny_llama, tmp_path, monkeypatch):
    """The tiny Llama quantized at two group sizes and benchmarked on CPU: decode measured at each
    batch size on both sides, and the fp16 worker ran once for both configurations."""
    from modelfactory.tasks.quantize import quantize_model

    workers = CountingWorkers()
    monkeypatch.setattr(step, "run_isolated", workers)
    merged = ModelArtifact(path=str(tiny_llama), sha="tiny-merged", source_uri=str(tiny_llama), kind="merged")
    spec = BenchmarkSpec.model_validate(TINY_BENCH)
    with own_work_dir(tmp_path / "work"):
        results = []
        for group_size in (32, 64):
            quant = quantize_model(model=merged, spec=QuantSpec.model_validate(
                {"bits": 4, "group_size": group_size, "calibration": {"num_samples": 4, "seq_len": 64}}), device="cpu")
            results.append(step.benchmark_models(baseline=merged, candidate=quant.model, spec=spec))
    assert workers.calls == ["fp16", "gptq", "gptq"]
    first, second = results
    assert second.baseline_reused and second.fp16 == first.fp16 and second.gptq != first.gptq
    for result in results:
        for side in (result.fp16, result.gptq):
            assert sorted(side.decode_tok_s_by_batch) == [1, 4], side
            assert all(rate > 0 for rate in side.decode_tok_s_by_batch.values())
            assert side.decode_tok_s == side.decode_tok_s_by_batch[1] and side.perplexity > 0
        ratios = result.ratios()
        assert ratios["decode_speedup_b4"] == pytest.approx(
            result.gptq.decode_tok_s_by_batch[4] / result.fp16.decode_tok_s_by_batch[4])


# --------------------------------------------------------------------------- spec
def test_decode_batch_sizes_default_and_validation():
    assert DecodeSpec().batch_sizes == (1, 8, 32)
    assert DecodeSpec(batch_sizes=[1, 4]).batch_sizes == (1, 4)
    for bad, words in [((1, 300), "between 1 and 256"), ((0, 1), "between 1 and 256"), ((8, 1), "ascending"),
                       ((1, 8, 8), "without repeats"), ((8, 32), "lacks 1"), ((), "at least 1")]:
        with pytest.raises(ValidationError, match=words):
            DecodeSpec(batch_sizes=bad)
    with pytest.raises(SpecError, match="benchmark.decode.batch_sizes"):
        parse_spec({"base": {"uri": "org/model"}, "benchmark": {"decode": {"batch_sizes": [1, 1024]}}})


# --------------------------------------------------------------------------- agreement outputs
def test_agreement_travels_with_the_result_and_a_baseline_without_its_reference_is_measured_again(workers, tmp_path):
    import shutil

    first = _run(tmp_path)
    assert first.agreement is not None and first.agreement.kld_p99 == CANNED_AGREEMENT.kld_p99
    assert first.agreement.kld_is_lower_bound  # top_k 4 < vocabulary 8
    assert _run(tmp_path).agreement == first.agreement  # reused with the stored stats
    shutil.rmtree(Path(first.baseline_path) / step.REFERENCE_DIR)
    again = _run(tmp_path)
    assert not again.baseline_reused and workers.calls == ["fp16", "gptq", "fp16"]
    off = _run(tmp_path, spec=BenchmarkSpec(agreement={"enabled": False}))
    assert off.agreement is None and "kld_mean" not in off.ratios()


def test_agreement_and_tasks_key_both_sides():
    key = step.baseline_key(model_sha="m", spec=BenchmarkSpec())
    for changed in ({"agreement": {"top_k": 32}}, {"agreement": {"enabled": False}}, {"tasks": {"names": ["piqa_local"]}}):
        assert step.baseline_key(model_sha="m", spec=BenchmarkSpec.model_validate(changed)) != key, changed
    assert step.baseline_key(model_sha="m", spec=BenchmarkSpec(runnability={"new_tokens": 8})) == key
    assert BenchmarkSpec(runnability={"new_tokens": 8}).candidate_inputs() == BenchmarkSpec().candidate_inputs()


# --------------------------------------------------------------------------- one decode treatment for both sides
def test_the_gptq_side_decodes_with_the_fp16_sides_treatment(workers, tmp_path):
    workers.cuda_graph = True
    result = _run(tmp_path)
    fp16_call, gptq_call = workers.kwargs
    assert fp16_call["treatment"] is None and fp16_call["allow_fallback"]  # the spec's, with its fallback
    assert gptq_call["treatment"] == "fused_compiled_graph"  # the one the fp16 side used
    assert result.fp16.decode_mode == result.gptq.decode_mode == "cuda_graph:fused_compiled_graph"
    assert result.decode_speedup(1) == 1.0


def test_when_the_gptq_side_falls_back_the_fp16_side_is_measured_again_with_the_fallback(workers, tmp_path):
    """Each side used to fall back on its own: a speed-up then compared a compiled graph with a plain one."""
    workers.cuda_graph = True
    workers.failing_treatment = {"gptq"}
    result = _run(tmp_path)
    assert workers.calls == ["fp16", "gptq", "fp16"]
    forced = workers.kwargs[2]
    assert forced["treatment"] == "graph" and not forced["allow_fallback"]
    assert result.fp16.decode_mode == result.gptq.decode_mode == "cuda_graph:graph"
    assert result.decode_speedup(8) is not None
    assert len(_committed(tmp_path, "benchmark-fp16")) == 2  # the spec's baseline and the forced one, each keyed
    again = _run(tmp_path)  # reused, with the fp16 side it was combined with
    assert again.reused and workers.calls == ["fp16", "gptq", "fp16"] and again.fp16 == result.fp16


def test_a_speed_up_between_two_decode_treatments_is_not_measured():
    fp16 = SideMetrics.model_validate(_side("fp16", SAME, decode_mode="cuda_graph:fused_compiled_graph"))
    gptq = SideMetrics.model_validate(_side("gptq", SAME, decode_mode="cuda_graph:graph"))
    from modelfactory.core.records import BenchmarkResult

    result = BenchmarkResult(fp16=fp16, gptq=gptq, path="x")
    assert result.decode_speedup(1) is None and result.ratios()["decode_speedup"] is None
    assert result.ratios()["decode_speedup_b8"] is None
