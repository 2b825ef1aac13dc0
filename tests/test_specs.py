"""Specs: defaults, immutability, field validation, source classification, YAML loading, UI schema."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfactory.core.errors import SpecError
from modelfactory.core.specs import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    FactorySpec,
    GateSpec,
    PerplexitySpec,
    QuantSpec,
    classify_source,
    load_spec,
    parse_spec,
)

HUB = {"base": {"uri": "HuggingFaceTB/SmolLM2-135M-Instruct"}}


def test_defaults_are_valid():
    spec = parse_spec(HUB)
    assert spec.base.kind == "hub"
    assert spec.base.repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert spec.adapters == ()
    assert spec.quantize.bits in SUPPORTED_BITS
    assert spec.quantize.group_size == "auto"  # resolved from the model's layer widths by the quantize step
    assert spec.quantize.calibration.text.split == "validation"
    perplexity = spec.benchmark.perplexity
    assert perplexity.stride <= perplexity.context_len
    assert spec.gate.model_dump() == {
        "preset": "default",  # unset thresholds take the default gate's (test_gate.py: the default gate)
        "require_default_path": False,
        "max_ppl_increase_pct": None, "min_decode_speedup": None, "min_decode_speedup_by_batch": None,
        "max_size_ratio": None, "max_memory_ratio": None, "max_kld_mean": None, "max_kld_p99": None,
        "min_top1_agreement_pct": None, "min_task_recovery_pct": None,
        "require_runnable": True,  # only checked when benchmark.runnability is enabled (the default)
    }
    assert spec.benchmark.agreement.enabled and spec.benchmark.runnability.enabled
    assert spec.benchmark.tasks.names == ()  # task accuracy is opt-in
    assert spec.trust_remote_code is False
    # Each sub-spec is valid on its own defaults too.
    assert QuantSpec() == spec.quantize
    assert GateSpec() == spec.gate


def test_spec_is_frozen():
    spec = parse_spec(HUB)
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"
    with pytest.raises(ValidationError, match="frozen"):
        spec.quantize.bits = 8


def test_extra_fields_rejected_with_their_path():
    with pytest.raises(SpecError) as info:
        parse_spec({**HUB, "quantize": {"bits": 4, "bitz": 3}, "colour": "red"})
    text = str(info.value)
    assert "quantize.bitz" in text
    assert "colour" in text
    assert "Extra inputs are not permitted" in text


def test_unsupported_bits_rejected_naming_value_and_allowed_set():
    with pytest.raises(SpecError) as info:
        parse_spec({**HUB, "quantize": {"bits": 5}})
    text = str(info.value)
    assert "quantize.bits" in text
    assert "bits=5" in text
    assert str(SUPPORTED_BITS) in text  # (2, 3, 4, 8)


def test_unsupported_group_size_rejected_naming_value_and_allowed_set():
    with pytest.raises(ValidationError) as info:
        QuantSpec(group_size=100)
    text = str(info.value)
    assert "group_size=100" in text
    assert str(SUPPORTED_GROUP_SIZES) in text


def test_every_invalid_field_reported_at_once():
    with pytest.raises(SpecError) as info:
        parse_spec({**HUB, "quantize": {"bits": 5, "group_size": 100}})
    text = str(info.value)
    assert "quantize.bits" in text and "quantize.group_size" in text


@pytest.mark.parametrize("uri", ["bad id!", "a/b/c", "hf://-x/y", "hf://a--b/c", "hf://a/b/c"])
def test_malformed_repo_ids_rejected_with_field_path(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "a/b/c" must not exist relative to the cwd
    with pytest.raises(SpecError) as info:
        parse_spec({"base": {"uri": uri}}, origin="my.yaml")
    text = str(info.value)
    assert "my.yaml" in text
    assert "base.uri" in text
    assert repr(uri) in text


def test_adapter_uri_errors_name_the_adapter_index():
    with pytest.raises(SpecError) as info:
        parse_spec({**HUB, "adapters": [{"uri": "org/ok"}, {"uri": "bad id!"}]})
    assert "adapters.1.uri" in str(info.value)


def test_adapter_cannot_be_gguf():
    with pytest.raises(SpecError, match="gguf"):
        parse_spec({**HUB, "adapters": [{"uri": "/models/lora.gguf"}]})


def test_classify_source(tmp_path, monkeypatch):
    assert classify_source("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert classify_source("hf://HuggingFaceTB/SmolLM2-135M") == "hub"
    assert classify_source("s3://bucket/models/llama") == "s3"
    assert classify_source("/models/smollm2.Q4_1.gguf") == "gguf"
    assert classify_source("model.GGUF") == "gguf"
    assert classify_source(str(tmp_path)) == "local"
    assert classify_source("./relative/folder") == "local"
    assert classify_source("~/models/x") == "local"
    # A relative path with more than one slash is local only when it exists.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="neither an existing local path"):
        classify_source("a/b/c")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert classify_source("a/b/c") == "local"


def test_stride_larger_than_context_rejected():
    with pytest.raises(ValidationError, match="stride=600 > context_len=512"):
        PerplexitySpec(context_len=512, stride=600)
    assert PerplexitySpec(context_len=512, stride=512).stride == 512
    with pytest.raises(SpecError, match="benchmark.perplexity"):
        parse_spec({**HUB, "benchmark": {"perplexity": {"context_len": 64, "stride": 128}}})


def test_load_spec_yaml(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: nightly\n"
        "base:\n  uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct\n  revision: main\n"
        "quantize:\n  bits: 8\n  group_size: 32\n  desc_act: true\n"
        "gate:\n  max_ppl_increase_pct: 15\n"
    )
    spec = load_spec(path)
    assert isinstance(spec, FactorySpec)
    assert spec.name == "nightly"
    assert spec.base.revision == "main"
    assert spec.quantize.label() == "gptq-8bit-32g-actorder"
    assert spec.gate.max_ppl_increase_pct == 15.0


def test_load_spec_invalid_field_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  uri: HuggingFaceTB/SmolLM2\nquantize:\n  bits: 5\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "quantize.bits" in str(info.value)


def test_load_spec_missing_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("content,typename", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType")])
def test_load_spec_non_mapping(tmp_path, content, typename):
    path = tmp_path / "list.yaml"
    path.write_text(content)
    with pytest.raises(SpecError, match=f"must hold a mapping.*got {typename}"):
        load_spec(path)


def test_load_spec_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base: {uri: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


@pytest.mark.parametrize(
    "kwargs,label",
    [
        ({}, "gptq-4bit-autog"),
        ({"group_size": 128}, "gptq-4bit-128g"),
        ({"group_size": -1}, "gptq-4bit-nogroup"),
        ({"bits": 8, "group_size": 32}, "gptq-8bit-32g"),
        ({"bits": 3, "group_size": 64, "desc_act": True}, "gptq-3bit-64g-actorder"),
    ],
)
def test_quant_label(kwargs, label):
    assert QuantSpec(**kwargs).label() == label


def test_group_size_auto_resolves_to_an_explicit_size_and_label():
    spec = QuantSpec(desc_act=True)
    resolved = spec.resolved(64)
    assert resolved.group_size == 64 and resolved.label() == "gptq-4bit-64g-actorder"
    assert resolved.desc_act and resolved.calibration == spec.calibration
    assert QuantSpec(group_size=32).resolved(64).group_size == 32, "an explicit size is kept"
    with pytest.raises(ValidationError, match="group_size=100"):
        spec.resolved(100)


@pytest.mark.parametrize("value", ["big", "Auto", 0, 100])
def test_group_size_other_strings_and_sizes_rejected(value):
    with pytest.raises(SpecError, match="quantize.group_size"):
        parse_spec({**HUB, "quantize": {"group_size": value}})


def test_json_schema_shows_quantize_fields_with_descriptions():
    schema = FactorySpec.model_json_schema()
    ref = schema["properties"]["quantize"]["$ref"]
    quant = schema["$defs"][ref.rsplit("/", 1)[-1]]
    for field in ("bits", "group_size", "damp_percent", "desc_act", "sym", "true_sequential"):
        assert field in quant["properties"], field
        assert quant["properties"][field].get("description"), f"{field} has no description"
    assert quant["properties"]["bits"]["default"] == 4
    assert quant["properties"]["group_size"]["default"] == "auto"
    assert quant["properties"]["group_size"]["enum"][0] == "auto"
    assert quant.get("additionalProperties") is False
    assert "base" in schema["required"]
