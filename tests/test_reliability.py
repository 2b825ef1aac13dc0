"""Faults injected for real: identical runs at once, a full disk, a lock holder that dies.

The full disk is a real 1 MiB tmpfs mounted for the test (the CI machine runs tests as root);
the concurrent runs are two real factory flow runs on the tiny model.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modelfactory.catalog import open_catalog
from modelfactory.core import workdir
from modelfactory.core.errors import DiskFullError
from modelfactory.core.manifest import build_manifest
from modelfactory.core.settings import get_settings
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing.local import publish_local
from modelfactory.testing.disks import small_disk
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import tiny_spec

TINY_GATE = {"max_ppl_increase_pct": 5.0, "max_size_ratio": 0.999}


# --------------------------------------------------------------------------- disk full


def test_publish_to_a_full_disk_removes_partial_files_and_says_so(tmp_path: Path) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(os.urandom(3 << 20))  # 3 MiB onto a 1 MiB disk
    manifest = build_manifest(source, name="m")
    with small_disk(tmp_path / "disk") as disk:
        with pytest.raises(DiskFullError) as info:
            publish_local(source=source, root=disk / "store", parts=("m", "gptq-4bit-128g", "k"), manifest=manifest)
        assert info.value.__cause__.errno == errno.ENOSPC
        message = str(info.value)
        assert "ran out of disk space" in message and str(disk / "store") in message and "MB free" in message
        assert not list((disk / "store").rglob("*.safetensors")), "partial files left behind"
        assert not (disk / "store" / "m" / "gptq-4bit-128g" / "k").exists()


def test_step_output_on_a_full_disk_is_removed(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        with pytest.raises(DiskFullError, match="the merge step ran out of disk space"):
            with workdir.building("merge", "k1", root=disk) as (tmp, _marker):
                (tmp / "model.safetensors").write_bytes(os.urandom(3 << 20))
        assert workdir.completed("merge", "k1", root=disk) is None
        assert list((disk / "merge").iterdir()) == []


def test_factory_run_with_a_full_store_fails_clearly_and_publishes_nothing(prefect, tiny_llama, tmp_path):
    with small_disk(tmp_path / "disk", size="256k") as disk:
        spec = tiny_spec(tiny_llama, name="disk-full", gate=TINY_GATE, publish={"destination": disk.as_uri()})
        with pytest.raises(DiskFullError):
            run_factory(spec)
        (run,) = open_catalog().list_runs(limit=1)
        detail = open_catalog().get_run(run.id)
        assert (detail.status, detail.error_kind) == ("failed", "disk_full")
        assert "ran out of disk space" in detail.error
        assert not detail.artifacts and not detail.publications
        assert not [p for p in disk.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- run lock


def test_run_lock_waits_for_the_holder(tmp_path: Path) -> None:
    order: list[str] = []
    waiting = threading.Event()

    def second() -> None:
        with workdir.run_lock("key", root=tmp_path, poll_s=0.05, on_wait=lambda _msg: waiting.set()):
            order.append("second")

    with workdir.run_lock("key", root=tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(10), "second holder did not wait"
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


def test_run_lock_of_a_killed_holder_is_released(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from modelfactory.core import workdir\n"
        f"with workdir.run_lock('key', root=Path({str(tmp_path)!r})):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(10)
        waits: list[str] = []
        with workdir.run_lock("key", root=tmp_path, poll_s=0.05, on_wait=waits.append):
            assert waits == [], "the dead holder's lock was not released"
    finally:
        holder.kill()


def test_two_identical_runs_at_once_one_works_the_other_reuses(prefect, tiny_llama, tmp_path):
    spec = tiny_spec(tiny_llama, name="twins", gate=TINY_GATE)
    outcomes: dict[int, object] = {}

    def run(i: int) -> None:
        outcomes[i] = run_factory(spec)

    with own_work_dir(tmp_path / "work"):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    assert len(outcomes) == 2, outcomes
    first, second = outcomes.values()
    assert first.status == second.status == "passed"
    assert first.artifact_uri == second.artifact_uri
    quantize = sorted(
        {s.name: s.status for s in open_catalog().get_run(o.run_id).steps}["quantize"] for o in (first, second)
    )
    assert quantize == ["ok", "reused"], "exactly one run quantizes, the other reuses its output"


# --------------------------------------------------------------------------- bad input


def test_architecture_gptqmodel_cannot_quantize_is_a_clear_error(tiny_llama, tmp_path):
    """A real Mamba model (no attention/MLP blocks GPTQModel knows): refused with the model type named."""
    import shutil

    from transformers import MambaConfig, MambaForCausalLM

    from modelfactory.core.errors import QuantizationError
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import QuantSpec
    from tasks.quantize import quantize_model

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


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbled header":
        path.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    elif how == "not safetensors":
        path.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")


@pytest.mark.parametrize("how", ["truncated", "garbled header", "not safetensors"])
def test_corrupted_safetensors_fail_the_run_clearly(prefect, tiny_llama, tmp_path, how):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    _corrupt(base / "model.safetensors", how)
    with own_work_dir(tmp_path / "work"):
        from modelfactory.core.errors import SourceError

        with pytest.raises(SourceError, match="model.safetensors is corrupted") as info:
            run_factory(tiny_spec(base, name="corrupt"))
    assert "download or save the model again" in str(info.value)
    (run,) = open_catalog().list_runs(limit=1)
    detail = open_catalog().get_run(run.id)
    assert (detail.status, detail.error_kind) == ("failed", "source")
    assert not detail.artifacts


def test_sound_checkpoints_pass_the_structure_check(tiny_llama):
    from modelfactory.sources.safetensors_check import safetensors_problem

    assert safetensors_problem(tiny_llama / "model.safetensors") is None


# --------------------------------------------------------------------------- killed quantization resumes


def _quantize_in_thread(model, spec, box):
    from tasks.quantize import quantize_model

    try:
        box["result"] = quantize_model(model=model, spec=spec, device="cpu")
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        box["error"] = exc


def _kill_worker_after_layer_checkpoints(work: Path, commits: int = 2, timeout: float = 300) -> None:
    """Wait until GPTQModel publishes *commits* new checkpoint generations (its ``CURRENT`` file
    changes: one per finished layer), then SIGKILL the worker process."""
    import psutil

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
    workers = [p for p in psutil.Process().children(recursive=True) if "modelfactory.core.isolated_child" in " ".join(p.cmdline())]
    assert workers, "no worker process to kill"
    for worker in workers:
        worker.kill()


def test_killed_quantization_resumes_from_its_layer_checkpoint(tmp_path, smollm2_tokenizer_dir, request):
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
    os.environ["MODELFACTORY_QUANTIZE_CHECKPOINTS"] = "true"
    get_settings.cache_clear()
    request.addfinalizer(lambda: (os.environ.pop("MODELFACTORY_QUANTIZE_CHECKPOINTS", None),
                                  get_settings.cache_clear()))
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
