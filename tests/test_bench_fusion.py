"""Decode-step treatments on CPU: fused q/k/v and gate/up compute the same model through transformers'
own forward, GPTQ kernels as opaque ops, the fused Marlin GEMM's calls into GPTQModel, the check."""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import get_args

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from modelfactory.benchmark.decode import reference_decode
from modelfactory.benchmark.fusion import (
    FusedMarlinLinear,
    FusedProjection,
    ProjectionSlice,
    _fuse,
    fuse_projections,
)
from modelfactory.benchmark.graph import GRAPH_TREATMENTS, DecodeCheck, GraphTreatment
from modelfactory.benchmark.kernels import (
    _OPAQUE_MODULES,
    choose_decode_mode,
    make_quant_linears_opaque,
)
from modelfactory.core.errors import SpecError
from modelfactory.core.records import RecordedDecodeMode
from modelfactory.core.specs import DecodeSpec

IDS = torch.tensor([[5, 17, 33, 9, 100, 7, 250]])


def _small_llama(*, kv_heads: int = 4, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         attention_bias=bias, mlp_bias=bias, pad_token_id=2, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    if bias:  # nn.Linear biases start at zero-ish scale; make them matter
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.5)
    return model


@pytest.fixture(params=["tiny_llama", "mha", "gqa_bias"])
def model(request):
    """The conftest tiny Llama (GQA, as the factory loads it), and variants: plain MHA, GQA with biases."""
    if request.param == "tiny_llama":
        return AutoModelForCausalLM.from_pretrained(request.getfixturevalue("tiny_llama"), dtype=torch.float32).eval()
    return _small_llama(kv_heads=4) if request.param == "mha" else _small_llama(kv_heads=2, bias=True)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


# --------------------------------------------------------------------------- dense fusion
def test_fused_model_computes_the_same_logits(model):
    """Prefill logits and a StaticCache greedy decode: fused equals unfused (fp32)."""
    logits = _logits(model)
    tokens, step_logits = reference_decode(model, input_ids=IDS, steps=8)
    assert fuse_projections(model) == 4  # 2 layers x (attention + MLP)
    assert torch.allclose(_logits(model), logits, rtol=1e-5, atol=1e-5)
    fused_tokens, fused_step_logits = reference_decode(model, input_ids=IDS, steps=8)
    assert fused_tokens == tokens
    assert torch.allclose(fused_step_logits, step_logits, rtol=1e-5, atol=1e-5)


def test_fusion_replaces_weights_and_keeps_transformers_forward(model):
    layer = model.model.layers[0]
    old_q = layer.self_attn.q_proj
    n_params = sum(p.numel() for p in model.parameters())
    fuse_projections(model)
    attn, mlp = layer.self_attn, layer.mlp
    assert old_q.weight.numel() == 0  # freed at once, not at the next gc
    assert sum(p.numel() for p in model.parameters()) == n_params  # one copy of every weight
    assert isinstance(attn.qkv_proj, FusedProjection) and isinstance(mlp.gate_up_proj, FusedProjection)
    for slice_, index in ((attn.q_proj, 0), (attn.k_proj, 1), (attn.v_proj, 2), (mlp.gate_proj, 0), (mlp.up_proj, 1)):
        assert isinstance(slice_, ProjectionSlice) and slice_.index == index
        assert list(slice_.parameters()) == []  # the fused weights are registered once, on the parent
    assert attn.qkv_proj.sizes == (old_q.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    assert not any(".q_proj." in name or ".gate_proj." in name for name in model.state_dict())
    # No transformers function is replaced or copied: the modules run their class's own forward.
    assert type(attn) is LlamaAttention and "forward" not in vars(attn)
    assert type(mlp) is LlamaMLP and "forward" not in vars(mlp)


def test_stock_forward_runs_each_fused_gemm_once_per_layer(model):
    """Fails loudly if transformers stops calling q/k/v (gate/up) on one hidden-state tensor: the
    logits would still match, but each slice would run the whole fused GEMM (slower, not fused)."""
    fuse_projections(model)
    projections = [m for m in model.modules() if isinstance(m, FusedProjection)]
    calls = {id(p): 0 for p in projections}
    for p in projections:
        p.linear.register_forward_hook(lambda mod, args, out, _p=p: calls.__setitem__(id(_p), calls[id(_p)] + 1))
    _logits(model)  # 1 forward
    reference_decode(model, input_ids=IDS, steps=3)  # prefill + 2 one-token steps: 3 forwards
    assert len(projections) == 4 and set(calls.values()) == {4}
    assert all(p._input is None and p._parts == () for p in projections)  # no activation held afterwards


def test_slices_of_other_inputs_recompute():
    """A slice called with another tensor than the pending one gets its own input's projection."""
    torch.manual_seed(1)
    parts = [torch.nn.Linear(16, n) for n in (8, 4, 4)]
    x1, x2 = (torch.randn(2, 16), torch.randn(2, 16))
    want = [[p(x) for p in parts] for x in (x1, x2)]
    projection = FusedProjection(_fuse(parts), [8, 4, 4])
    q, k, v = (ProjectionSlice(projection, i) for i in range(3))
    with torch.no_grad():
        assert torch.allclose(q(x1), want[0][0], atol=1e-6)
        assert torch.allclose(k(x2), want[1][1], atol=1e-6)  # not x1's k
        assert torch.allclose(v(x1), want[0][2], atol=1e-6)
        assert torch.allclose(q(x1), want[0][0], atol=1e-6)  # read twice
        assert torch.allclose(projection(x2), torch.cat(want[1], dim=-1), atol=1e-6)


def test_fuse_projections_is_idempotent(model):
    assert fuse_projections(model) == 4
    logits = _logits(model)
    assert fuse_projections(model) == 0
    assert torch.equal(_logits(model), logits)


def test_fused_model_traces_as_one_graph_with_opaque_gemms(model):
    """torch.compile (Dynamo + AOT, no Inductor codegen on CPU) traces the fused model, its fused
    GEMMs routed through the opaque custom op as the fused Marlin GEMM is, without a graph break."""
    logits = _logits(model)
    fuse_projections(model)
    for p in model.modules():
        if isinstance(p, FusedProjection):
            p.linear._mf_opaque = True  # stands in for FusedMarlinLinear (not runnable on CPU)
    assert make_quant_linears_opaque(model) == 4
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        got = compiled(input_ids=IDS).logits
    assert torch.allclose(got, logits, rtol=1e-5, atol=1e-5)
    assert all(p._input is None for p in model.modules() if isinstance(p, FusedProjection))


def test_unfusable_layers_are_left_alone():
    model = _small_llama()
    model.model.layers[0].self_attn.k_proj = torch.nn.Identity()  # not a dense or Marlin layer
    logits = _logits(model)
    assert fuse_projections(model) == 3
    assert not hasattr(model.model.layers[0].self_attn, "qkv_proj")
    assert torch.allclose(_logits(model), logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Marlin (GPU kernel; calls checked on CPU)
class MarlinLinear(torch.nn.Module):
    """The attributes of GPTQModel's MarlinLinear that fusion reads (named alike: fusion matches by name)."""

    def __init__(self, k: int, n: int, *, bias: bool = False, desc_act: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.desc_act = k, n, desc_act
        self.bias = torch.zeros(n) if bias else None
        self._marlin_tile_padding = None
        self.qweight = torch.randint(0, 2**31 - 1, (k // 16, n * 2), dtype=torch.int32)
        self.scales = torch.rand(k // 32, n, dtype=torch.float16)
        self.qzeros, self.g_idx, self.g_idx_sort_indices = torch.empty(0), torch.empty(0), torch.empty(0)
        self.workspace, self.weight_type, self.is_k_full, self.fp32 = torch.zeros(8), object(), True, True


@pytest.mark.parametrize("atomics", [False, True])
def test_fused_marlin_concatenates_and_calls_gptqmodel_as_it_expects(monkeypatch, atomics):
    from gptqmodel.utils import marlin

    parts = [MarlinLinear(128, n) for n in (128, 64, 64)]
    qweight, scales = torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1)
    for p in parts:  # as after a compiled treatment ran unfused: reached through the opaque op
        p._mf_opaque = True
    make_quant_linears_opaque(torch.nn.ModuleList(parts))
    registered = [p._mf_opaque_index for p in parts]
    fused = _fuse(parts, marlin_atomics=atomics)
    assert isinstance(fused, FusedMarlinLinear) and fused._mf_opaque and fused.out_features == 256
    assert torch.equal(fused.qweight, qweight) and torch.equal(fused.scales, scales)
    assert all(p.qweight.numel() == 0 and p.scales.numel() == 0 for p in parts)
    assert all(_OPAQUE_MODULES[i] is None for i in registered)  # not kept alive by the op registry

    seen = {}
    real = marlin.gptq_marlin_gemm if atomics else marlin.apply_gptq_marlin_linear

    def fake(*args, **kwargs):
        seen.update(inspect.signature(real).bind(*args, **kwargs).arguments)  # GPTQModel's own signature
        x = args[0] if atomics else kwargs["input"]  # atomics: GPTQModel's GEMM takes 2-D input
        return torch.zeros(*x.shape[:-1], 256)

    monkeypatch.setattr(marlin, real.__name__, fake)
    out = fused(torch.randn(1, 3, 128))
    assert out.shape == (1, 3, 256)
    assert seen["size_n" if atomics else "output_size_per_partition"] == 256
    assert seen["size_k" if atomics else "input_size_per_partition"] == 128
    assert torch.equal(seen["b_q_weight" if atomics else "weight"], qweight)


@pytest.mark.parametrize("bad", [{"bias": True}, {"desc_act": True}, {"n": 96}])
def test_marlin_layers_that_cannot_be_concatenated_are_refused(bad):
    parts = [MarlinLinear(128, 128), MarlinLinear(128, bad.pop("n", 64), **bad)]
    with pytest.raises(ValueError, match="cannot fuse Marlin layer"):
        _fuse(parts)
    assert parts[0].qweight.numel() > 0  # nothing released


# --------------------------------------------------------------------------- treatments and their check
def test_treatment_names_agree_everywhere():
    assert set(GRAPH_TREATMENTS) == set(get_args(GraphTreatment))
    offered = get_args(DecodeSpec.model_fields["graph_treatment"].annotation)
    assert set(offered) <= set(GRAPH_TREATMENTS) and DecodeSpec().graph_treatment in offered
    recorded = set(get_args(RecordedDecodeMode))
    assert {f"cuda_graph:{name}" for name in GRAPH_TREATMENTS} | {"eager"} <= recorded


def test_treatment_check_threshold():
    good = DecodeCheck(steps=32, logits_max_rel_err=1e-2, logits_mean_rel_err=1e-3,
                       teacher_forced_top1_agreement=1.0, free_run_token_agreement=1.0, free_run_matching_prefix=32)
    assert good.passed
    assert not replace(good, logits_max_rel_err=float("inf")).passed
    assert not replace(good, teacher_forced_top1_agreement=0.5).passed


def test_choose_decode_mode():
    assert choose_decode_mode("auto", device="cpu") == "eager"
    assert choose_decode_mode("auto", device="cuda") == "cuda_graph"
    assert choose_decode_mode("eager", device="cuda") == "eager"
    with pytest.raises(SpecError, match="cuda_graph"):
        choose_decode_mode("cuda_graph", device="cpu")
