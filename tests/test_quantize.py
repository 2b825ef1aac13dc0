"""Step 3, quantize (GPTQModel): the checkpoint loads in plain transformers, unsupported settings and
architectures are refused clearly, out-of-memory says what to do, and a killed quantization resumes
from its layer checkpoint with the same result."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from modelfactory.core.errors import SpecError
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing.local import local_root
from modelfactory.testing.catalog import latest_run
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import tiny_spec
from modelfactory.testing.prefect_server import step_processes


def test_quantized_checkpoint_loads_in_plain_transformers(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_root(tiny_run.outcome.artifact_uri)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "gptq" and qconfig["bits"] == 4 and qconfig["group_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "QuantLinear" in "".join(c.__name__ for c in type(model.model.layers[0].mlp.down_proj).__mro__)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False)
    assert out.shape[1] == len(tokenizer("Hello")["input_ids"]) + 5


def test_unsupported_bits_fails_clearly(prefect, tiny_llama):
    with pytest.raises(SpecError, match=r"bits=5 is not supported.*\(2, 3, 4, 8\)"):
        run_factory(tiny_spec(tiny_llama, quantize={"bits": 5}))
    run = latest_run()
    assert run.status == "failed"
    assert run.error_kind == "spec" and "bits" in run.error



def test_architecture_gptqmodel_cannot_quantize_is_a_clear_error(tiny_llama, tmp_path):
    """A real Mamba model (no attention/MLP blocks GPTQModel knows): refused at once, before any calibration or
    quantization process starts, with the model type named."""
    import shutil

    from transformers import MambaConfig, MambaForCausalLM

    from modelfactory.core.errors import QuantizationError
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import QuantSpec
    from modelfactory.tasks.quantize import quantize_model

    model_dir = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, state_size=8)).save_pretrained(
        model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_llama / name, model_dir / name)
    spec = QuantSpec.model_validate({"bits": 4, "group_size": 32, "calibration": {"num_samples": 4, "seq_len": 64}})
    artifact = ModelArtifact(path=str(model_dir), sha="mamba", source_uri=str(model_dir), kind="local")
    with own_work_dir(tmp_path / "work"):
        with pytest.raises(QuantizationError, match="model_type 'mamba'") as info:
            quantize_model(model=artifact, spec=spec, device="cpu")
    assert "is not supported" in str(info.value) and "llama" in str(info.value)
    assert len(str(info.value)) < 1500, "no module dump in the message"
    assert not list((tmp_path / "work").rglob("*.log")), "no quantize step process was started"


@pytest.mark.parametrize("cpu_dtype", ["float32", "bfloat16"])
def test_a_cpu_quantization_stores_the_same_16_bit_artifact_whatever_it_computed_in(tiny_llama, tmp_path, set_env,
                                                                                     cpu_dtype):
    """A CPU without native bf16 computes in float32 (``MODELFACTORY_CPU_DTYPE`` forces either here); the
    artifact stores its unquantized tensors in bfloat16 either way, as it always did on CPU."""
    from safetensors import safe_open

    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import QuantSpec
    from modelfactory.core.workdir import read_marker
    from modelfactory.tasks.quantize import quantize_model

    set_env(MODELFACTORY_CPU_DTYPE=cpu_dtype)
    spec = QuantSpec.model_validate({"bits": 4, "group_size": 32, "calibration": {"num_samples": 4, "seq_len": 64}})
    merged = ModelArtifact(path=str(tiny_llama), sha="tiny-merged", source_uri=str(tiny_llama), kind="merged")
    with own_work_dir(tmp_path / "work"):
        result = quantize_model(model=merged, spec=spec, device="cpu")
        folder = Path(result.model.path)
        assert read_marker(folder)["dtype"] == cpu_dtype  # what it computed in
    dtypes: dict[str, str] = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as stored:
            dtypes |= {name: stored.get_slice(name).get_dtype() for name in stored.keys()}  # noqa: SIM118
    assert "F32" not in dtypes.values()
    assert {dtypes[n] for n in dtypes if n.endswith(".scales")} == {"F16"}  # GPTQ's own format, untouched
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == "BF16"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_out_of_memory_error_names_step_model_size_and_advice(tiny_llama):
    import torch

    from modelfactory.core.devices import out_of_memory_error
    from modelfactory.core.errors import OutOfMemoryError, is_transient

    raised = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
    error = out_of_memory_error("quantize", model_path=str(tiny_llama), device="cpu", exc=raised,
                          advice="lower quantize.batch_size")
    assert isinstance(error, OutOfMemoryError) and not is_transient(error)
    message = str(error)
    assert "quantize step ran out of memory" in message and "GB of weights" in message
    assert "lower quantize.batch_size" in message and "Tried to allocate 20.00 GiB" in message
    assert "more detail" not in message


# --------------------------------------------------------------------------- killed quantization resumes


def _quantize_in_thread(model, spec, box):
    from modelfactory.tasks.quantize import quantize_model

    try:
        box["result"] = quantize_model(model=model, spec=spec, device="cpu")
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        box["error"] = exc


def _kill_worker_after_layer_checkpoints(work: Path, commits: int = 2, timeout: float = 300) -> None:
    """Wait until GPTQModel publishes *commits* new checkpoint generations (its ``CURRENT`` file
    changes: one per finished layer), then SIGKILL the worker process."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline and len(seen) <= commits:
        current = list((work / "quantize").glob(".*.checkpoint/layers/CURRENT"))
        content = current[0].read_text() if current else None
        if content and (not seen or content != seen[-1]):
            seen.append(content)  # the first one is the starting point, then one per commit
        time.sleep(0.01)
    if len(seen) <= commits:
        pytest.fail(f"the quantization committed only {len(seen) - 1} layer checkpoint(s) under {work}")
    workers = step_processes()
    assert workers, "no worker process to kill"
    for worker in workers:
        worker.kill()


def test_killed_quantization_resumes_from_its_layer_checkpoint(tmp_path, smollm2_tokenizer_dir, set_env):
    """8-layer Llama: an uninterrupted run vs one whose worker is SIGKILLed after two layer checkpoints."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelfactory.core.errors import WorkerError
    from modelfactory.core.hashing import tree_sha256
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import QuantSpec

    model_dir = tmp_path / "llama8"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(model_dir)
    for file in smollm2_tokenizer_dir.iterdir():
        shutil.copy2(file, model_dir / file.name)
    model = ModelArtifact(path=str(model_dir), sha=tree_sha256(model_dir), source_uri=str(model_dir), kind="local")
    spec = QuantSpec.model_validate({"bits": 4, "group_size": 32, "calibration": {"num_samples": 32, "seq_len": 256}})

    timings = {}
    set_env(MODELFACTORY_QUANTIZE_CHECKPOINTS="true")
    with own_work_dir(tmp_path / "work-full"):
        started = time.perf_counter()
        box: dict = {}
        _quantize_in_thread(model, spec, box)
        timings["uninterrupted_s"] = time.perf_counter() - started
        full = box["result"]
    with own_work_dir(tmp_path / "work-killed") as work:
        started = time.perf_counter()
        box = {}
        thread = threading.Thread(target=_quantize_in_thread, args=(model, spec, box))
        thread.start()
        _kill_worker_after_layer_checkpoints(work)
        thread.join(120)
        timings["until_killed_s"] = time.perf_counter() - started
        assert isinstance(box.get("error"), WorkerError), box  # "exited with code -9 without a result"
        assert not list((work / "quantize").glob("*/_COMPLETE.json")), "a killed quantization left an output"
        assert list((work / "quantize").glob(".*.checkpoint/layers/CURRENT")), "no layer checkpoint was kept"

        started = time.perf_counter()
        box = {}
        _quantize_in_thread(model, spec, box)
        timings["resumed_s"] = time.perf_counter() - started
        resumed = box["result"]
        log = next_log(work).read_text(errors="replace")
        resumed_at = re.search(r"resuming from the layer checkpoint .*: step (\d+) of (\d+) already done", log)
        assert resumed_at, "the second attempt did not resume"
        done, total = map(int, resumed_at.groups())
        assert 0 < done < total, (done, total)
        timings["steps_skipped"], timings["steps_total"] = done, total
        assert not list((work / "quantize").glob(".*.checkpoint")), "checkpoint kept after success"

    a = load_file(Path(full.model.path) / "model.safetensors")
    b = load_file(Path(resumed.model.path) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed result differs"
    saved = json.loads((Path(resumed.model.path) / "quantize_config.json").read_text())
    assert "offload_to_disk_path" not in saved.get("meta", {}), "machine-local path in the checkpoint"
    timings["saved_s"] = timings["uninterrupted_s"] - timings["resumed_s"]
    print(f"\nquantize resume timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


def next_log(work: Path) -> Path:
    """The quantize step's worker log in *work* (one key per test), waiting for it to appear."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list((work / "quantize").glob("*.log")) if (work / "quantize").exists() else []
        if logs:
            return logs[0]
        time.sleep(0.2)
    pytest.fail(f"no quantize log appeared under {work}")
