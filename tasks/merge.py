"""Step 2 — merge: fold LoRA adapters into the base weights with peft, then prove it.

Before loading anything heavy, every adapter's LoRA matrices are checked against the base
checkpoint's weight shapes (read from safetensors headers). After merging, the logits of the
merged model are compared with base+adapters unmerged on fixed random token ids, in fp32
(bf16/fp16 rounding alone moves logits by ~1); a difference over the tolerance is an error and
nothing is saved.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from prefect import task

from modelfactory import stage_store
from modelfactory.core import workdir
from modelfactory.core.errors import AdapterMismatchError, MergeVerificationError
from modelfactory.core.hashing import step_key
from modelfactory.core.log import progress
from modelfactory.core.records import AdapterArtifact, MergeResult, ModelArtifact
from modelfactory.core.specs import MergeSpec
from modelfactory.sources.safetensors_check import check_safetensors

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of all tensors in a folder's safetensors files, without loading them."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def check_adapter_fits(*, base_dir: Path, adapter_dir: Path, adapter_label: str) -> None:
    """Raise :class:`AdapterMismatchError` if the adapter's LoRA shapes don't fit the base weights."""
    base = tensor_shapes(base_dir)
    base_arch = json.loads((base_dir / "config.json").read_text()).get("architectures", ["?"])[0]
    adapter = tensor_shapes(adapter_dir)
    if not adapter:
        raise AdapterMismatchError(f"adapter {adapter_label!r} holds no safetensors weights: re-save it with peft")
    for name, shape in adapter.items():
        match = _LORA_KEY.match(name)
        if not match:
            continue
        module = match["module"]
        weight = base.get(f"{module}.weight")
        if weight is None:
            raise AdapterMismatchError(
                f"adapter {adapter_label!r} targets module {module!r}, which the base model "
                f"({base_arch}) does not have: the adapter was trained on another base model"
            )
        out_features, in_features = weight[0], weight[-1]
        expected, got = (in_features, shape[-1]) if match["ab"] == "A" else (out_features, shape[0])
        if expected != got:
            side = "in_features" if match["ab"] == "A" else "out_features"
            raise AdapterMismatchError(
                f"adapter {adapter_label!r}: {module} lora_{match['ab']} has {side}={got} but the base "
                f"model ({base_arch}) has {expected}: the adapter was trained on another base model"
            )


def adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_combinable(adapters: tuple[AdapterArtifact, ...]) -> None:
    """Refuse adapter sets peft cannot merge exactly.

    Only LoRA adapters merge into plain weights. Several LoRAs combine by concatenation (peft's
    ``cat``), which is exact for any ranks and target modules; but full copies of modules
    (``modules_to_save``, e.g. a retrained ``lm_head``) cannot be weighted, and DoRA's magnitude
    vectors do not add up, so those are merged only one at a time.
    """
    for adapter in adapters:
        kind = adapter_config(Path(adapter.path)).get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise AdapterMismatchError(
                f"adapter {adapter.source_uri!r} is a {kind} adapter: only LoRA adapters can be merged into "
                f"the base weights; convert or retrain it as LoRA"
            )
    if len(adapters) < 2 and all(a.weight == 1.0 for a in adapters):
        return
    for adapter in adapters:
        config = adapter_config(Path(adapter.path))
        if config.get("modules_to_save"):
            raise AdapterMismatchError(
                f"adapter {adapter.source_uri!r} also saves full modules {config['modules_to_save']}, which "
                f"cannot be weighted or combined with other adapters: merge it alone (weight 1.0)"
            )
        if config.get("use_dora"):
            raise AdapterMismatchError(
                f"adapter {adapter.source_uri!r} is a DoRA adapter, whose magnitude vectors cannot be weighted "
                f"or combined with other adapters: merge it alone (weight 1.0)"
            )


def _verification_ids(vocab_size: int, spec: MergeSpec):
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, vocab_size, (spec.verify_batch, spec.verify_tokens), generator=generator)


def _checkpoint_dtype(model_dir: Path):
    """The dtype a checkpoint was saved in (``dtype`` / ``torch_dtype`` of its config.json), else float16."""
    import torch

    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float16


def _merge_into(out_dir: Path, base: ModelArtifact, adapters: tuple[AdapterArtifact, ...], spec: MergeSpec) -> float:
    """Merge, verify and save to *out_dir*; returns the max |Δlogit|."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    progress(f"merge: loading base {base.source_uri} in fp32")
    save_dtype = _checkpoint_dtype(Path(base.path))  # read before loading: loading in fp32 overwrites config.dtype
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0].path, adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(adapter.path, adapter_name=name)
    if len(adapters) > 1 or adapters[0].weight != 1.0:
        progress(f"merge: combining {len(adapters)} adapter(s) with weights {[a.weight for a in adapters]}")
        peft_model.add_weighted_adapter(
            adapters=names, weights=[a.weight for a in adapters], adapter_name="combined", combination_type="cat"
        )
        peft_model.set_adapter("combined")
    ids = _verification_ids(model.config.vocab_size, spec)
    with torch.inference_mode():
        unmerged = peft_model(input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    diff = float((merged - unmerged).abs().max())
    progress(f"merge: max |merged - unmerged| logit = {diff:.3g} (tolerance {spec.tolerance:g})")
    if not diff <= spec.tolerance:  # also catches NaN
        raise MergeVerificationError(
            f"merged model differs from base+adapters by max |Δlogit|={diff:.4g} > tolerance {spec.tolerance:g}: "
            "check the adapters (NaN/huge weights?) or raise merge.tolerance if the difference is expected"
        )
    merged_model.to(save_dtype).save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (Path(base.path) / name).is_file():
            shutil.copy2(Path(base.path) / name, out_dir / name)
    return diff


def merge_adapters(*, base: ModelArtifact, adapters: tuple[AdapterArtifact, ...], spec: MergeSpec) -> MergeResult:
    """Merge *adapters* (in order, weighted) into *base*; reuse a finished merge with the same inputs."""
    start = time.perf_counter()
    adapters = tuple(adapters)
    local_base = base.model_copy(update={"path": str(stage_store.resolve(base.path))})  # fetched if built elsewhere
    check_safetensors(Path(local_base.path), label=f"base model {base.source_uri}")
    for adapter in adapters:
        check_safetensors(Path(adapter.path), label=f"adapter {adapter.source_uri}")
    if not adapters:
        return MergeResult(base=base, model=base, adapters=(), max_abs_logit_diff=None, tolerance=spec.tolerance)
    for adapter in adapters:
        check_adapter_fits(base_dir=Path(local_base.path), adapter_dir=Path(adapter.path),
                           adapter_label=adapter.source_uri)
    check_combinable(adapters)
    key = step_key("merge", base=base.sha, adapters=[(a.sha, a.weight) for a in adapters], spec=spec)
    done = stage_store.find("merge", key)
    reused = done is not None
    if reused:
        diff = done.marker["max_abs_logit_diff"]
        progress(f"merge: reusing {done.uri}")
    else:
        with workdir.building("merge", key) as (tmp, marker):
            diff = _merge_into(tmp, local_base, adapters, spec)
            marker.update(base_sha=base.sha, adapters=[a.model_dump() for a in adapters], max_abs_logit_diff=diff)
        done = stage_store.publish("merge", key)
    model = ModelArtifact(path=done.uri, sha=key, source_uri=base.source_uri, kind="merged", reused=reused,
                          duration_s=time.perf_counter() - start)
    return MergeResult(base=base, model=model, adapters=adapters, max_abs_logit_diff=diff, tolerance=spec.tolerance)


@task(name="merge")
def merge_task(base: ModelArtifact, adapters: tuple[AdapterArtifact, ...], spec: MergeSpec) -> MergeResult:
    return merge_adapters(base=base, adapters=adapters, spec=spec)
