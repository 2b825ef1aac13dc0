"""Step 3 — quantize: GPTQ with GPTQModel, in an isolated worker process.

Output: a standard GPTQ checkpoint (``config.json`` with ``quantization_config`` + safetensors),
loadable by plain ``transformers.AutoModelForCausalLM.from_pretrained`` and by vLLM. Runs on
CUDA when present, else CPU. The output folder is keyed by the input model's SHA and the
canonical quantization spec; a finished one is reused.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import task

from modelfactory import stage_store
from modelfactory.benchmark.layer_widths import (
    choose_group_size,
    layer_widths_from_config,
)
from modelfactory.core import workdir
from modelfactory.core.devices import (
    apply_memory_cap,
    gpu_env,
    heartbeat,
    out_of_memory_error,
    resolve_device,
    resolve_dtype,
)
from modelfactory.core.errors import CalibrationError, QuantizationError
from modelfactory.core.gpu_share import gpu_turn
from modelfactory.core.hashing import step_key
from modelfactory.core.isolation import run_isolated
from modelfactory.core.log import progress
from modelfactory.core.records import ModelArtifact, QuantResult
from modelfactory.core.settings import get_settings
from modelfactory.core.specs import CalibrationSpec, QuantSpec
from modelfactory.sources.text import load_text, require_tokens

#: GPTQModel's per-layer progress line, forwarded to the Prefect log.
GPTQMODEL_LAYER = (re.compile(r"layer \[(\d+) of (\d+)\]"), "quantize: layer {0} of {1}")


def calibration_windows(token_ids: list[int], *, num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """*num_samples* windows of *seq_len* tokens at seeded random offsets (distinct when possible)."""
    import random

    n = len(token_ids)
    if n < seq_len + 1:
        raise CalibrationError(
            f"calibration text has {n} tokens, fewer than one window of seq_len={seq_len}: "
            "use a longer text or a smaller seq_len"
        )
    rng = random.Random(seed)
    starts = list(range(0, n - seq_len + 1, seq_len))
    if len(starts) >= num_samples:
        chosen = sorted(rng.sample(starts, num_samples))
    else:  # overlapping windows: still deterministic
        chosen = [rng.randrange(0, n - seq_len + 1) for _ in range(num_samples)]
    return [token_ids[s : s + seq_len] for s in chosen]


def build_calibration(tokenizer, spec: CalibrationSpec) -> tuple[list[dict[str, list[int]]], str]:
    text, origin = load_text(spec.text)
    if not text.strip():
        raise CalibrationError(f"calibration text {origin!r} is empty: give a text with content")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    require_tokens(len(ids), spec.seq_len + 1, what="calibration", label=origin)
    windows = calibration_windows(ids, num_samples=spec.num_samples, seq_len=spec.seq_len, seed=spec.seed)
    return [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows], origin


def checkpointable(model_path: str, spec: QuantSpec) -> bool:
    """Whether GPTQModel 7.6 can checkpoint this quantization: a Llama-family safetensors model,
    quantized layer by layer (``true_sequential``), without GPTAQ or FOEM (``validate_checkpoint_support``)."""
    folder = Path(model_path)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    has_safetensors = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return model_type == "llama" and spec.true_sequential and not (spec.gptaq or spec.foem) and has_safetensors


def checkpoint_progress(folder: Path) -> tuple[int, int] | None:
    """``(steps done, steps in all)`` of the newest GPTQModel checkpoint in *folder*, or ``None``."""
    try:
        refs = json.loads((folder / "CURRENT").read_text())["generations"]
        manifests = [json.loads((folder / "objects" / ref).read_text()) for ref in refs]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    newest = max(manifests, key=lambda m: m.get("cursor", -1), default=None)
    if not newest:
        return None
    return int(newest["cursor"]), len(newest.get("identity", {}).get("execution_plan", []))


def resolve_group_size(spec: QuantSpec, model_path: str) -> QuantSpec:
    """*spec* with ``group_size: auto`` replaced by the largest of 128, 64, 32 that divides every
    quantized layer's input width in *model_path*'s ``config.json`` (the default kernels, CPU
    int4pack included, need that: ``modelfactory.benchmark.layer_widths``). Explicit sizes are kept."""
    if spec.group_size != "auto":
        return spec
    widths = layer_widths_from_config(json.loads((Path(model_path) / "config.json").read_text()))
    group = choose_group_size(in_features=widths.in_features)
    progress(f"quantize: group_size auto -> {group} (layer input widths {', '.join(map(str, widths.in_features))})")
    return spec.resolved(group)


def _scrub_local_paths(out_dir: str) -> None:
    """Drop the machine-local offload/checkpoint path GPTQModel writes into quantize_config.json."""
    path = Path(out_dir) / "quantize_config.json"
    config = json.loads(path.read_text())
    meta = config.get("meta") or {}
    if meta.pop("offload_to_disk_path", None) is not None:
        meta["offload_to_disk"] = False
        path.write_text(json.dumps(config, indent=2))


#: The dtype a CPU quantization stores its unquantized tensors (embeddings, norms, lm_head) in, whatever
#: it computed in: a CPU without native bf16 computes in float32 (:func:`~modelfactory.core.devices.cpu_dtype`),
#: and GPTQModel saves the tensors in the dtype it computed in, which would make the artifact larger
#: (SmolLM2-135M: 171 vs 115 MB) and differ by host. GPU quantizations compute and store float16.
CPU_STORE_DTYPE = "bfloat16"


def store_float32_as(folder: Path, *, dtype: str) -> int:
    """Rewrite every float32 tensor in *folder*'s safetensors files as *dtype*, keeping each file's
    metadata, and say *dtype* in ``config.json``; returns how many tensors were rewritten.

    Written by hand: GPTQModel has no save dtype, and a cast in memory cannot reach the layers its disk
    offload (``quantize_checkpoints``) keeps on the meta device.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    rewritten = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as stored:
            names = list(stored.keys())
            wide = {name for name in names if stored.get_slice(name).get_dtype() == "F32"}
            if not wide:
                continue
            metadata = stored.metadata()
            tensors = {name: stored.get_tensor(name) for name in names}
        tensors.update({name: tensors[name].to(getattr(torch, dtype)) for name in wide})
        save_file(tensors, path, metadata=metadata)
        rewritten += len(wide)
    index = folder / "model.safetensors.index.json"
    if rewritten and index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(_data_bytes(p) for p in folder.glob("*.safetensors"))
        index.write_text(json.dumps(data, indent=2))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)  # the older name of the same field
    config_path.write_text(json.dumps(config, indent=2))
    return rewritten


def _data_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file: its size less the length-prefixed JSON header."""
    with path.open("rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
    return path.stat().st_size - 8 - header_len


#: GPTAQ's weight of the input-drift term: its recommended value, GPTQModel 7.6's ``GPTAQConfig`` default.
GPTAQ_ALPHA = 0.25
#: FOEM's first-order term: GPTQModel 7.6's ``FOEMConfig`` default (its docs: 0.1-0.25 works well).
FOEM_BETA = 0.2


def quantize_config_args(spec: QuantSpec) -> dict:
    """GPTQModel ``QuantizeConfig`` arguments for *spec* (group size resolved): every quality lever passed
    explicitly, ``act_group_aware: auto`` resolved, so a GPTQModel with other defaults quantizes the same.
    GPTAQ and FOEM together are GPTQModel's FOEM with alpha > 0 (its ``FOEMConfig`` docs)."""
    from gptqmodel.quantization.config import FOEMConfig, GPTAQConfig

    return {
        "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "true_sequential": spec.true_sequential,
        "damp_percent": spec.damp_percent, "damp_auto_increment": spec.damp_auto_increment,
        "desc_act": spec.desc_act, "act_group_aware": spec.act_group_aware_on, "static_groups": spec.static_groups,
        "mse": spec.mse,
        "gptaq": GPTAQConfig(alpha=GPTAQ_ALPHA) if spec.gptaq and not spec.foem else None,
        "foem": FOEMConfig(alpha=GPTAQ_ALPHA if spec.gptaq else 0.0, beta=FOEM_BETA) if spec.foem else None,
    }


def run_gptq(*, model_path: str, out_dir: str, spec: dict, device: str, checkpoint_dir: str | None = None) -> dict:
    """Worker body (runs in the isolated process): quantize *model_path* into *out_dir*.

    With *checkpoint_dir* (kept across attempts by :func:`quantize_model`), GPTQModel commits each
    finished layer there, and an attempt after a crash resumes from the last one.
    """
    import gptqmodel
    import torch
    from gptqmodel import CheckpointConfig, QuantizeConfig

    qspec = resolve_group_size(QuantSpec.model_validate(spec), model_path)
    device = resolve_device(device)
    apply_memory_cap(device)
    dtype_name = resolve_dtype("auto", device)  # float16 on CUDA; on a CPU bfloat16 where native, else float32
    dtype = getattr(torch, dtype_name)
    config = QuantizeConfig(
        **quantize_config_args(qspec),
        # Checkpointing needs GPTQModel's disk offload; its path is scrubbed from the saved config.
        offload_to_disk=checkpoint_dir is not None,
        offload_to_disk_path=str(Path(checkpoint_dir) / "offload") if checkpoint_dir else None,
    )
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = CheckpointConfig(path=str(Path(checkpoint_dir) / "layers"), resume="auto")
        done = checkpoint_progress(Path(checkpoint_dir) / "layers")
        if done is not None:
            progress(f"quantize: resuming from the layer checkpoint in {checkpoint_dir}: "
                     f"step {done[0]} of {done[1]} already done")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with gpu_turn(device, exclusive=False, what="quantize"):  # never during another member's timing
            # The calibration text is read and tokenized while GPTQModel loads the model (both mostly wait on
            # disk and single-threaded Python: overlapped, not added to the step).
            with ThreadPoolExecutor(max_workers=1) as pool:
                tokenized = pool.submit(_tokenized_calibration, model_path, qspec.calibration)
                model = _load_for_gptq(model_path, config, dtype=dtype, device=device)
                timings["load_s"] = time.perf_counter() - start
                tokenizer, calibration, origin = tokenized.result()
            progress(f"quantize: {len(calibration)} calibration windows x {qspec.calibration.seq_len} tokens from "
                     f"{origin}; GPTQ {qspec.label()} on {device} ({dtype}) started")
            with heartbeat("quantize"):
                model.quantize(calibration, batch_size=qspec.batch_size, tokenizer=tokenizer, checkpoint=checkpoint)
        quantize_s = time.perf_counter() - start
        timings["engine_s"] = quantize_s - timings["load_s"]
        saved = time.perf_counter()
        model.save(out_dir)
        _scrub_local_paths(out_dir)
        if dtype_name == "float32":
            count = store_float32_as(Path(out_dir), dtype=CPU_STORE_DTYPE)
            progress(f"quantize: computed in float32 (no native bfloat16 here, or MODELFACTORY_CPU_DTYPE); "
                     f"{count} unquantized tensors stored as {CPU_STORE_DTYPE}")
        timings["save_s"] = time.perf_counter() - saved
    except torch.OutOfMemoryError as exc:
        raise out_of_memory_error("quantize", model_path=model_path, device=device, exc=exc,
                            advice="lower quantize.batch_size, calibration.seq_len or calibration.num_samples, "
                                   "or run on a GPU with more memory") from exc
    tokenizer.save_pretrained(out_dir)
    progress(f"quantize: done in {quantize_s:.1f} s (load {timings['load_s']:.1f} s, GPTQ {timings['engine_s']:.1f} s; "
             f"saved in {timings['save_s']:.1f} s)")
    return {"quantize_s": quantize_s, "device": device, "dtype": dtype_name, "timings": timings,
            "engine": f"gptqmodel {gptqmodel.__version__}"}


def _tokenized_calibration(model_path: str, spec: CalibrationSpec):
    """``(tokenizer, calibration windows, where the text came from)`` for the quantize step."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration, origin = build_calibration(tokenizer, spec)
    return tokenizer, calibration, origin


def _load_for_gptq(model_path: str, config, *, dtype, device: str):
    """``GPTQModel.load`` (the architecture was checked before the step started: :func:`check_supported`)."""
    from gptqmodel import GPTQModel

    return GPTQModel.load(model_path, config, dtype=dtype, device=device)


def supported_model_types() -> frozenset[str]:
    """The ``model_type`` values GPTQModel has a definition for (its ``MODEL_MAP``)."""
    from gptqmodel.models.auto import MODEL_MAP

    return frozenset(MODEL_MAP)


def check_supported(model_path: str) -> None:
    """Raise :class:`~modelfactory.core.errors.QuantizationError` at once for an architecture GPTQModel has no
    definition for: rejected before any calibration or quantization time is spent, with what to do."""
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    known = supported_model_types()
    if model_type not in known:
        common = ", ".join(sorted(k for k in known if k in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3",
                                                             "phi3", "gpt_neox", "opt", "falcon")))
        raise QuantizationError(
            f"GPTQModel cannot quantize {model_path}: its architecture (config.json model_type {model_type!r}) is not "
            f"supported by GPTQModel {_gptqmodel_version()} ({common}, ... {len(known)} in all). Use a model of a "
            f"supported architecture, or a GPTQModel version that supports {model_type!r}")


def _gptqmodel_version() -> str:
    from importlib.metadata import version

    return version("gptqmodel")


def quantize_model(*, model: ModelArtifact, spec: QuantSpec, device: str = "auto") -> QuantResult:
    """GPTQ-quantize *model*; reuse a finished output with identical inputs."""
    start = time.perf_counter()
    if spec.group_size == "auto":  # keyed as resolved: 'auto' and its explicit size share outputs
        spec = resolve_group_size(spec, str(stage_store.resolve(model.path)))
    key = step_key("quantize", model=model.sha, spec=spec)
    done = stage_store.find("quantize", key)
    if done is None:
        check_supported(str(stage_store.resolve(model.path)))
    reused = done is not None
    if reused:
        progress(f"quantize: reusing {done.uri}")
        info = done.marker
    else:
        model_path = str(stage_store.resolve(model.path))  # fetched when it was built on another host
        log_path = workdir.step_dir("quantize", key).with_suffix(".log")
        # Outlives a failed attempt (unlike the build folder), so the next attempt resumes from it.
        checkpoint_dir = workdir.step_dir("quantize", key).parent / f".{key}.checkpoint"
        use_checkpoint = get_settings().quantize_checkpoints and checkpointable(model_path, spec)
        with workdir.building("quantize", key) as (tmp, marker):
            scratch = tmp.parent / f".{key}.scratch"  # GPTQModel writes ./logs into its cwd
            scratch.mkdir(exist_ok=True)
            try:
                info = run_isolated(
                    run_gptq,
                    kwargs={"model_path": model_path, "out_dir": str(tmp), "spec": spec.model_dump(mode="json"),
                            "device": device, "checkpoint_dir": str(checkpoint_dir) if use_checkpoint else None},
                    log_path=log_path, env=gpu_env(), cwd=scratch, unexpected=QuantizationError,
                    library_progress=GPTQMODEL_LAYER,
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            marker.update(info, source_sha=model.sha, spec=spec.model_dump(mode="json"))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        done = stage_store.publish("quantize", key)
        if done.adopted:  # another host stored its build of this key first: that one is the output
            info, reused = done.marker, True
    # Identified by its content, so what the benchmark measures and what is published are provably the same files.
    artifact = ModelArtifact(path=done.uri, sha=done.content, source_uri=model.source_uri, kind="gptq", reused=reused,
                             duration_s=time.perf_counter() - start)
    return QuantResult(model=artifact, quantize_s=info["quantize_s"], engine=info["engine"], device=info["device"],
                       group_size=spec.group_size)


@task(name="quantize")
def quantize_task(model: ModelArtifact, spec: QuantSpec, device: str = "auto") -> QuantResult:
    return quantize_model(model=model, spec=spec, device=device)
