"""LoRA merging with real peft on the tiny Llama: shape checks, equivalence, weights, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfactory.core.errors import AdapterMismatchError, SourceError
from modelfactory.core.hashing import tree_sha256
from modelfactory.core.records import AdapterArtifact, ModelArtifact
from modelfactory.core.specs import AdapterSpec, MergeSpec
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import make_lora, make_tiny_llama
from modelfactory.tasks.download import resolve_adapter
from modelfactory.tasks.merge import check_adapter_fits, merge_adapters

Q_PROJ = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module", autouse=True)
def _own_work_dir(tmp_path_factory):
    """Merges made by other test modules must not be reused here."""
    with own_work_dir(tmp_path_factory.mktemp("merge-work")):
        yield


@pytest.fixture(scope="module")
def base(tiny_llama) -> ModelArtifact:
    return ModelArtifact(path=str(tiny_llama), sha=tree_sha256(tiny_llama), source_uri=str(tiny_llama), kind="local")


@pytest.fixture(scope="module")
def lora_dirs(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return make_lora(tiny_llama, root / "one", seed=1), make_lora(tiny_llama, root / "two", rank=8, seed=2)


@pytest.fixture(scope="module")
def foreign_lora(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """An adapter trained on a different (32-wide) tiny Llama."""
    root = tmp_path_factory.mktemp("foreign")
    other = make_tiny_llama(root / "base32", smollm2_tokenizer_dir, hidden=32)
    return make_lora(other, root / "lora32")


def adapter(path: Path, weight: float = 1.0) -> AdapterArtifact:
    return resolve_adapter(spec=AdapterSpec(uri=str(path), weight=weight))


def logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def lora_delta(adapter_dir: Path, module: str):
    """scaling * B @ A of one module, straight from the adapter's files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = weights(adapter_dir)
    a = tensors[f"base_model.model.{module}.lora_A.weight"].float()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].float()
    return (config["lora_alpha"] / config["r"]) * (b @ a)


# --------------------------------------------------------------------------- resolve / check
def test_resolve_adapter_local(lora_dirs):
    art = adapter(lora_dirs[0], weight=0.7)
    assert art.path == str(lora_dirs[0].resolve())
    assert art.sha == tree_sha256(lora_dirs[0])
    assert art.weight == 0.7


def test_resolve_adapter_without_config(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="no adapter_config.json"):
        resolve_adapter(spec=AdapterSpec(uri=str(tmp_path)))


def test_check_adapter_fits_accepts_matching_adapter(tiny_llama, lora_dirs):
    for lora in lora_dirs:
        check_adapter_fits(base_dir=tiny_llama, adapter_dir=lora, adapter_label="mine")


def test_check_adapter_fits_rejects_other_hidden_size(tiny_llama, foreign_lora):
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter_fits(base_dir=tiny_llama, adapter_dir=foreign_lora, adapter_label="lora32")
    message = str(info.value)
    assert "'lora32'" in message
    assert "model.layers.0.self_attn." in message  # the module
    assert "=32" in message and "has 64" in message  # both sizes
    assert "LlamaForCausalLM" in message


def test_check_adapter_fits_rejects_missing_module(tiny_llama, lora_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    bad.mkdir()
    tensors = load_file(lora_dirs[0] / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "query_key_value"): v for k, v in tensors.items()}, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="query_key_value.*does not have"):
        check_adapter_fits(base_dir=tiny_llama, adapter_dir=bad, adapter_label="renamed")


def test_check_adapter_fits_rejects_adapter_without_weights(tiny_llama, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterMismatchError, match="no safetensors"):
        check_adapter_fits(base_dir=tiny_llama, adapter_dir=tmp_path, adapter_label="empty")


def test_merge_refuses_mismatched_adapter_before_loading(base, foreign_lora):
    with pytest.raises(AdapterMismatchError):
        merge_adapters(base=base, adapters=(adapter(foreign_lora),), spec=MergeSpec())


# --------------------------------------------------------------------------- merge
def test_no_adapters_returns_base_unchanged(base):
    result = merge_adapters(base=base, adapters=(), spec=MergeSpec(tolerance=0.5))
    assert result.model == base and result.base == base
    assert result.adapters == ()
    assert result.max_abs_logit_diff is None
    assert result.tolerance == 0.5


def test_merge_one_adapter_verifies_changes_logits_and_is_reused(base, lora_dirs, tiny_llama):
    import torch

    adapters = (adapter(lora_dirs[0]),)
    result = merge_adapters(base=base, adapters=adapters, spec=MergeSpec())
    assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff < 1e-3
    assert result.model.kind == "merged" and result.model.reused is False
    assert result.base == base and result.adapters == adapters
    merged_dir = Path(result.model.path)
    assert (merged_dir / "_COMPLETE.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file()  # the merged folder is a complete model folder

    # The merged checkpoint keeps the base's dtype (fp16), not the fp32 used for the check.
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in weights(merged_dir).values()} == {torch.float16}

    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(5))
    merged, original = logits(merged_dir, ids), logits(tiny_llama, ids)
    assert torch.isfinite(merged).all()
    assert float((merged - original).abs().max()) > 1e-2  # the adapter had an effect

    again = merge_adapters(base=base, adapters=adapters, spec=MergeSpec())
    assert again.model.reused is True
    assert again.model.path == result.model.path and again.model.sha == result.model.sha
    assert again.max_abs_logit_diff == result.max_abs_logit_diff

    other_weight = merge_adapters(base=base, adapters=(adapter(lora_dirs[0], weight=2.0),), spec=MergeSpec())
    assert other_weight.model.reused is False and other_weight.model.path != result.model.path


def test_merge_two_weighted_adapters(base, lora_dirs, tiny_llama):
    import torch

    adapters = (adapter(lora_dirs[0], weight=0.5), adapter(lora_dirs[1], weight=1.5))
    result = merge_adapters(base=base, adapters=adapters, spec=MergeSpec(verify_batch=1, verify_tokens=32))
    assert result.max_abs_logit_diff < 1e-3
    assert result.model.reused is False
    assert [a.weight for a in result.adapters] == [0.5, 1.5]

    # The merged weight is base + sum(weight_i * scaling_i * B_i @ A_i).
    merged = weights(Path(result.model.path))
    original = weights(tiny_llama)
    for module in (Q_PROJ, "model.layers.0.self_attn.v_proj"):
        expected = (original[f"{module}.weight"].float() + 0.5 * lora_delta(lora_dirs[0], module)
                    + 1.5 * lora_delta(lora_dirs[1], module))
        got = merged[f"{module}.weight"].float()
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-4)
        unweighted = original[f"{module}.weight"].float() + lora_delta(lora_dirs[0], module) + lora_delta(
            lora_dirs[1], module)
        assert not torch.allclose(got, unweighted, rtol=2e-3, atol=2e-4)
    # Modules no adapter targets are untouched.
    torch.testing.assert_close(merged["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- combining different adapters


def test_adapters_with_different_ranks_and_targets_combine_exactly(base, lora_dirs, tiny_llama, tmp_path):
    """rank 4 on q/v + rank 8 on k/o/up: concatenation is exact, so the merge equals the weighted sum."""
    import torch

    other = make_lora(tiny_llama, tmp_path / "kou", rank=8, seed=3, targets=("k_proj", "o_proj", "up_proj"))
    adapters = (adapter(lora_dirs[0], weight=0.7), adapter(other, weight=1.3))
    result = merge_adapters(base=base, adapters=adapters, spec=MergeSpec(verify_batch=1, verify_tokens=32))
    assert result.max_abs_logit_diff < 1e-3
    merged, original = weights(Path(result.model.path)), weights(tiny_llama)
    layer = "model.layers.0"
    expectations = {
        f"{layer}.self_attn.q_proj": 0.7 * lora_delta(lora_dirs[0], f"{layer}.self_attn.q_proj"),
        f"{layer}.self_attn.k_proj": 1.3 * lora_delta(other, f"{layer}.self_attn.k_proj"),
        f"{layer}.mlp.up_proj": 1.3 * lora_delta(other, f"{layer}.mlp.up_proj"),
        f"{layer}.mlp.down_proj": 0,  # targeted by neither
    }
    for module, delta in expectations.items():
        expected = original[f"{module}.weight"].float() + delta
        torch.testing.assert_close(merged[f"{module}.weight"].float(), expected, rtol=2e-3, atol=2e-4)


def test_non_lora_adapter_is_refused(base, tiny_llama, tmp_path):
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterMismatchError, match="is a IA3 adapter: only LoRA adapters can be merged"):
        merge_adapters(base=base, adapters=(adapter(tmp_path / "ia3"),), spec=MergeSpec())


def test_adapter_with_full_modules_cannot_be_combined(base, lora_dirs, tiny_llama, tmp_path):
    full = make_lora(tiny_llama, tmp_path / "full", seed=4, modules_to_save=["lm_head"])
    with pytest.raises(AdapterMismatchError, match=r"also saves full modules \['lm_head'\].*merge it alone"):
        merge_adapters(base=base, adapters=(adapter(lora_dirs[0]), adapter(full)), spec=MergeSpec())
