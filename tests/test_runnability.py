"""Runs where users run it: plain-transformers load + generate + compare in a process without factory code,
whose fault a failure is, and the group size choice.

The process tests run the real ``plain_load.py`` (a fresh ``python -I``, as the factory does) on real GPTQ
artifacts of the tiny random Llama, quantized with the factory's own step on CPU, against the factory's own
reference (:func:`measure_reference`); the broken artifacts are :mod:`modelfactory.testing.broken`'s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelfactory.benchmark import plain_load
from modelfactory.benchmark.layer_widths import (
    choose_group_size,
    fitting_group_sizes,
    layer_widths_from_config,
)
from modelfactory.benchmark.load_failures import classify_failure, explain_failure
from modelfactory.benchmark.runnability import (
    PLAIN_LOAD_SCRIPT,
    RunnabilityReference,
    check_runs_plainly,
    load_snippet,
    measure_reference,
    resolve_devices,
    result_from_child,
)
from modelfactory.core.errors import SpecError
from modelfactory.core.specs import BenchmarkSpec
from modelfactory.testing.broken import break_artifact
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import make_tiny_llama
from modelfactory.testing.prefect_server import step_processes

#: config.json of SmolLM2-135M(-Instruct) and of Llama-2-7B, the parts that set the layer widths.
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64}
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32}
INT4PACK_ERROR = "_weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize, got K:576, qGroupSize:128"


# --------------------------------------------------------------------------- group size from layer widths
def test_smollm2_widths_choose_group_64():
    widths = layer_widths_from_config(SMOLLM2)
    assert widths.in_features == (576, 1536)
    assert widths.out_features == (192, 576, 1536)
    assert widths.linears["self_attn.k_proj"] == (576, 192)
    assert choose_group_size(in_features=widths.in_features) == 64
    assert choose_group_size(in_features=[576, 1536]) == 64


def test_llama_7b_widths_choose_group_128():
    widths = layer_widths_from_config(LLAMA_7B)
    assert widths.in_features == (4096, 11008)
    assert choose_group_size(in_features=widths.in_features) == 128


def test_head_dim_times_heads_is_o_proj_input_width():
    # Qwen3-4B: hidden 2560 but 32 heads x head_dim 128 = 4096 into o_proj
    widths = layer_widths_from_config({"hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                                       "num_key_value_heads": 8, "head_dim": 128})
    assert widths.linears["self_attn.o_proj"] == (4096, 2560)
    assert widths.linears["self_attn.k_proj"] == (2560, 1024)
    assert widths.in_features == (2560, 4096, 9728)


def test_moe_experts_widths_are_included():
    widths = layer_widths_from_config({"hidden_size": 2048, "num_attention_heads": 16, "moe_intermediate_size": 1408,
                                       "shared_expert_intermediate_size": 5632})
    assert widths.linears["mlp.experts.down_proj"] == (1408, 2048)
    assert widths.linears["mlp.shared_expert.down_proj"] == (5632, 2048)
    assert choose_group_size(in_features=widths.in_features) == 128


def test_preference_order_is_respected():
    assert choose_group_size(in_features=[4096], preferred=(64, 128)) == 64
    assert fitting_group_sizes([576, 1536]) == [64, 32]


def test_width_divisible_by_no_preferred_size_is_a_spec_error_with_advice():
    with pytest.raises(SpecError) as info:
        choose_group_size(in_features=[1000, 4096])
    text = str(info.value)
    assert "1000 (= 125 x 8)" in text, "names the width that does not fit, and its power-of-two factor"
    assert "4096 (" not in text, "widths that fit are not blamed"
    assert "set quantize.group_size explicitly" in text


def test_missing_config_key_says_what_to_do():
    with pytest.raises(SpecError, match="no usable 'intermediate_size'.*set quantize.group_size explicitly"):
        layer_widths_from_config({"hidden_size": 64, "num_attention_heads": 4})


def test_multimodal_text_config_is_used():
    assert layer_widths_from_config({"model_type": "llava", "text_config": SMOLLM2}).in_features == (576, 1536)


# --------------------------------------------------------------------------- explanations
def test_int4pack_error_explained_with_the_group_size_that_fits():
    text = explain_failure(error_type="RuntimeError", message=INT4PACK_ERROR, device="cpu",
                           widths=layer_widths_from_config(SMOLLM2), kernel="TorchAtenLinear", stage="generate")
    assert "group size 128 does not divide layer width 576" in text
    assert "use group_size 64 (or 32 or 16)" in text
    assert "TorchAtenLinear" in text
    assert INT4PACK_ERROR in text, "the library's own message is kept"


def test_int4pack_error_explained_without_widths_uses_the_width_in_the_message():
    text = explain_failure(error_type="RuntimeError", message=INT4PACK_ERROR, device="cpu")
    assert "group size 128 does not divide layer width 576" in text and "use group_size 64" in text


def test_machete_out_features_error_names_the_layers_and_that_group_size_does_not_change_widths():
    message = ("<class 'gptqmodel.nn_modules.qlinear.machete.MacheteLinear'>: `out_features`: 192 must be "
               "divisible by [128].")
    text = explain_failure(error_type="NotImplementedError", message=message, device="cuda",
                           widths=layer_widths_from_config(SMOLLM2))
    assert "MacheteLinear" in text and "output width to be a multiple of 128" in text
    assert "self_attn.k_proj (192)" in text and "self_attn.o_proj (576)" in text
    assert "mlp.gate_proj" not in text, "1536 is a multiple of 128"
    assert "the group size does not change these widths" in text
    assert "another standard kernel" in text and "GPTQConfig(bits=..., backend=...)" in text
    assert "group size MacheteLinear does not take (it takes -1, 64, 128; e.g. 32)" in text
    assert message in text


def test_in_features_group_size_validation_error_explained():
    message = ("<class 'gptqmodel.nn_modules.qlinear.marlin.MarlinLinear'>: `in_features`: 576 must be divisible "
               "by `group_size: 128`.")
    text = explain_failure(error_type="NotImplementedError", message=message, device="cuda",
                           widths=layer_widths_from_config(SMOLLM2))
    assert "group size 128 does not divide layer width 576" in text and "use group_size 64" in text


def test_unknown_error_passes_through_with_the_library_message():
    text = explain_failure(error_type="OSError", message="Can't load tokenizer for '/x'. Make sure...", device="cpu")
    assert "OSError: Can't load tokenizer for '/x'" in text and "not a known pattern" in text


def test_a_run_that_imported_factory_code_is_void():
    data = {"plain_load": 1, "ok": True, "stage": "done", "tokens": 4, "text": "abc", "kernel": "TorchAtenLinear",
            "factory_modules": ["modelfactory", "modelfactory.core"]}
    result = result_from_child(data, device="cpu", snippet="...", wall_s=1.0)
    assert not result.ok and result.error_type == "FactoryImport"
    assert "modelfactory.core" in result.explanation


def test_devices():
    assert resolve_devices(["cpu", "cpu"]) == ("cpu",)
    assert resolve_devices("auto")[0] == "cpu"
    with pytest.raises(SpecError, match="'tpu'"):
        resolve_devices(["tpu"])


# --------------------------------------------------------------------------- snippet
def test_load_snippet_is_the_code_the_check_runs():
    card = load_snippet(model="org/model-gptq", device="cpu", revision="gptq-4bit-64g")
    assert 'AutoModelForCausalLM.from_pretrained("org/model-gptq", revision="gptq-4bit-64g")' in card
    assert "max_new_tokens=4, do_sample=False" in card
    cuda = load_snippet(model="/m", device="cuda")
    assert 'from_pretrained("/m", device_map="cuda")' in cuda
    assert 'AutoTokenizer.from_pretrained("/m")\n' in cuda
    compile(card, "card", "exec")


def test_plain_load_script_imports_no_factory_code():
    source = PLAIN_LOAD_SCRIPT.read_text()
    imports = [line.strip() for line in source.splitlines() if line.strip().startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "modelfactory" in line or line.split()[1] in ("tasks", "flows")]


# --------------------------------------------------------------------------- real artifacts, real process
def _quantize(model_dir: Path, work: Path, group_size: int | str):
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import QuantSpec
    from modelfactory.tasks.quantize import quantize_model

    spec = QuantSpec.model_validate({"bits": 4, "group_size": group_size,
                                     "calibration": {"num_samples": 8, "seq_len": 64}})
    artifact = ModelArtifact(path=str(model_dir), sha=f"tiny-{model_dir.name}", source_uri=str(model_dir),
                             kind="local")
    with own_work_dir(work):
        return quantize_model(model=artifact, spec=spec, device="cpu")


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rwork")


@pytest.fixture(scope="module")
def tiny_gptq(tiny_llama, tiny_work) -> Path:
    """The tiny Llama (input widths 64 and 128) quantized with group_size auto (-> 64)."""
    result = _quantize(tiny_llama, tiny_work, "auto")
    assert result.group_size == 64
    return Path(result.model.path)


@pytest.fixture(scope="module")
def tiny_gptq_misfit(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny Llama of width 96 quantized with group size 64: quantizes fine, cannot run int4pack on CPU."""
    base = make_tiny_llama(tmp_path_factory.mktemp("tiny96"), smollm2_tokenizer_dir, hidden=96)
    return Path(_quantize(base, tmp_path_factory.mktemp("rwork96"), 64).model.path)


def _reference(model_dir: Path) -> RunnabilityReference:
    """The factory's own reference for *model_dir* (the benchmark's CPU loading path), in this process."""
    return RunnabilityReference.model_validate(measure_reference(
        model_path=str(model_dir), spec=BenchmarkSpec(device="cpu").model_dump(mode="json"),
        prompt=plain_load.DEFAULT_PROMPT, check_tokens=32))


def test_near_ties_keep_the_argmax_first_and_every_token_within_the_tolerance():
    import torch

    from modelfactory.benchmark.runnability import near_ties

    logp = torch.tensor([[-1.0, -1.1, -3.0, -1.0], [-0.1, -5.0, -6.0, -7.0]] + [[0.0] * 4] * 0)
    logp = torch.cat([logp, torch.full((2, 12), -20.0)], dim=1)  # a vocabulary of 16
    assert near_ties(logp, nats=0.25) == [[0, 3, 1], [0]]  # argmax (lowest id of a tie) first
    assert near_ties(logp, nats=0.0) == [[0, 3], [0]]
    assert len(near_ties(torch.zeros(1, 32), nats=1.0)[0]) == 16  # bounded


def test_a_near_tie_that_flips_is_not_a_disagreement():
    """plain_load counts an argmax among the reference's near-tied tokens as agreeing (kernels differ in the last
    bits); anything else does not."""
    import torch

    class Fixed(torch.nn.Module):  # a "model" whose argmax is token 2 at every position
        device = torch.device("cpu")

        def forward(self, input_ids):
            logits = torch.zeros(1, input_ids.shape[1], 8)
            logits[..., 2] = 1.0
            return type("Out", (), {"logits": logits})()

    reference = {"token_ids": [5, 6, 7, 1, 1], "prompt_len": 3, "top1": [3, 3], "near": [[3, 2], [3]]}
    assert plain_load.teacher_forced(Fixed(), reference) == {"positions": 2, "top1_agree": 1, "logits_finite": True}
    del reference["near"]  # a reference without near-ties: argmax against argmax
    assert plain_load.teacher_forced(Fixed(), reference)["top1_agree"] == 0


def test_good_artifact_runs_on_cpu_without_factory_code_and_computes_what_was_measured(tiny_gptq, tmp_path):
    import torch

    reference = _reference(tiny_gptq)
    assert reference.ok and reference.logits_finite and len(reference.top1) == 32
    assert not torch._dynamo.config.disable, "eager on CPU only while measuring: this process compiles again after"
    assert len(reference.token_ids) == reference.prompt_len + 32
    report = check_runs_plainly(model_dir=tiny_gptq, devices=["cpu"], timeout_s=600, reference=reference,
                                log_path=tmp_path / "log")
    assert report.passed and report.default_path_works, report.summary()
    (result,) = report.results
    assert result.ok and result.device == "cpu" and result.stage == "done" and result.backend is None
    assert result.factory_modules == ()
    assert result.kernel == "TorchAtenLinear", "GPTQModel's default CPU kernel, as a user gets it"
    assert result.tokens == plain_load.DEFAULT_NEW_TOKENS and result.text
    assert (result.positions, result.top1_agreement_pct, result.logits_finite) == (32, 100.0, True)
    assert result.load_s > 0 and result.generate_s > 0 and result.wall_s >= result.load_s
    assert result.versions["transformers"] and result.versions["gptqmodel"]
    assert result.snippet == load_snippet(model=str(tiny_gptq.resolve()), device="cpu")
    log = (tmp_path / "log").read_text()
    assert result.snippet in log and '{"plain_load": 2, "ok": true' in log
    assert report.verified_paths() == {"cpu": "default"}


def test_garbage_output_is_rejected(tiny_gptq, tmp_path):
    """Loads and generates, but computes something else than the measured model (here: the measured model is
    the healthy artifact, the files checked have every scale x10): "it produced a token" is not enough. (The
    tiny model's random weights barely move its argmax under milder damage: its tied embeddings dominate.)"""
    collapsed = break_artifact(tiny_gptq, tmp_path / "scales", how="scales", factor=10.0)
    report = check_runs_plainly(model_dir=collapsed, devices=["cpu"], timeout_s=600, reference=_reference(tiny_gptq))
    (result,) = report.results  # it ran: no other loading path is tried, the output itself is wrong
    assert result.stage == "done" and not result.ok and result.failure_kind == "artifact"
    assert result.tokens > 0 and result.top1_agreement_pct < 90, result.top1_agreement_pct
    assert "computes something else than the model the factory measured" in result.explanation
    assert not report.passed and report.devices[0].status == "broken"


def test_nan_output_is_rejected_before_anything_else(tiny_gptq, tmp_path):
    poisoned = break_artifact(tiny_gptq, tmp_path / "nan", how="nan", layer=1)
    reference = _reference(poisoned)
    assert not reference.ok and reference.failure_kind == "artifact" and reference.logits_finite is False
    assert "not finite" in reference.explanation
    # a plain load of it, compared with the healthy model's reference: the NaN logits are caught there too
    (result,) = check_runs_plainly(model_dir=poisoned, devices=["cpu"], timeout_s=600,
                                   reference=_reference(tiny_gptq)).results
    assert not result.ok and result.logits_finite is False and "not finite" in result.explanation


def test_a_default_kernel_that_cannot_serve_the_shape_falls_back_to_a_standard_one(tiny_gptq_misfit):
    """GPTQModel's default CPU kernel rejects a width the group size does not divide: that is the default kernel's
    limit, not a broken artifact; the portable kernel runs it, and the report says which path works and why."""
    report = check_runs_plainly(model_dir=tiny_gptq_misfit, devices=["cpu"], timeout_s=600,
                                reference=_reference(tiny_gptq_misfit))
    default, fallback = report.results
    assert default.stage == "generate" and default.error_type == "RuntimeError" and default.failure_kind == "kernel"
    assert "expect K to be divisible by qGroupSize, got K:96, qGroupSize:64" in default.error_message
    assert "group size 64 does not divide layer width 96" in default.explanation
    assert "use group_size 32" in default.explanation
    assert "_weight_int4pack_mm" in default.traceback_tail
    assert fallback.ok and fallback.backend == "gptq_torch" and fallback.top1_agreement_pct >= 90
    assert 'quantization_config=GPTQConfig(bits=4, backend="gptq_torch")' in fallback.snippet
    assert report.passed and not report.default_path_works
    assert report.verified_paths() == {"cpu": "gptq_torch"} and default.explanation in report.summary()


def test_corrupted_config_fails_at_load_with_the_library_message(tiny_gptq, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gptq, broken)
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (result,) = check_runs_plainly(model_dir=broken, devices=["cpu"], timeout_s=600).results
    assert not result.ok and result.stage == "load" and result.failure_kind == "artifact"
    assert result.error_message and result.error_message in result.explanation
    assert "not a known pattern" in result.explanation


def test_timeout_kills_the_process_and_is_the_hosts_doing(tiny_gptq):
    report = check_runs_plainly(model_dir=tiny_gptq, devices=["cpu"], timeout_s=0.05)
    assert [r.error_type for r in report.results] == ["Timeout", "Timeout"]  # the default path, then the fallback
    assert all(r.failure_kind == "environment" and "raise the timeout" in r.explanation for r in report.results)
    assert report.environment_only and not report.passed and report.devices[0].status == "not_verified"
    assert step_processes() == [], "the killed check left a process behind"


def test_group_size_auto_is_resolved_recorded_and_shares_the_explicit_output(tiny_gptq, tiny_llama, tiny_work):
    from modelfactory.core.specs import QuantSpec
    from modelfactory.tasks.quantize import resolve_group_size

    assert resolve_group_size(QuantSpec(), str(tiny_llama)).group_size == 64
    assert resolve_group_size(QuantSpec(group_size=32), str(tiny_llama)).group_size == 32
    assert json.loads((tiny_gptq / "quantize_config.json").read_text())["group_size"] == 64
    explicit = _quantize(tiny_llama, tiny_work, 64)
    assert explicit.model.reused and Path(explicit.model.path) == tiny_gptq and explicit.group_size == 64


def test_machete_fetching_cutlass_offline_is_explained_from_the_traceback():
    """Seen on an H200 (bench/results/llama2-7b-shape-gptq-4bit-128g-verdict-h200.json): the default Hopper
    kernel downloads CUTLASS at first load; offline, the library only says 'name resolution'."""
    tail = ('  File ".../gptqmodel/utils/machete.py", line 379, in _ensure_cutlass_source\n'
            '    _download_cutlass_archive(_CUTLASS_RELEASE_URL, archive_path)\n'
            'urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name resolution>')
    kind, text = classify_failure(error_type="URLError", message="<urlopen error [Errno -3] Temporary failure in "
                                  "name resolution>", device="cuda", traceback_tail=tail)
    assert kind == "environment"  # the host is offline: not the artifact's fault
    assert "Machete" in text and "CUTLASS" in text and "GPTQMODEL_CUTLASS_DIR" in text
    assert "modelfactory kernels prepare" in text
    assert "name resolution" in text  # the library's own error stays in the explanation


@pytest.mark.parametrize("error_type,message,kind", [
    ("RuntimeError", "Machete: GPTQMODEL_OFFLINE=1 and no verified CUTLASS v4.7.1 source cache is available", "environment"),
    ("RuntimeError", "Error building extension 'marlin_fp16': nvcc: not found", "environment"),
    ("OSError", "CUDA_HOME environment variable is not set. Please set it to your CUDA install root.", "environment"),
    ("ProcessDied", "plain_load exited with code -9 without a result", "environment"),
    ("Timeout", "no result within 600 s; killed", "environment"),
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", "environment"),
    ("NotImplementedError", "MacheteLinear: out_features: 192 must be divisible by [128]", "kernel"),
    ("RuntimeError", INT4PACK_ERROR, "kernel"),
    ("IndexError", "index 32064 is out of bounds for dimension 0 with size 32064", "artifact"),
])
def test_whose_fault_a_failure_is(error_type, message, kind):
    assert classify_failure(error_type=error_type, message=message, device="cuda")[0] == kind
