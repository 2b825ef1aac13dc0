"""Fuzzing the spec parser (hypothesis): any input gives a FactorySpec or a SpecError, nothing else."""

from __future__ import annotations

import copy
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfactory.core.errors import SpecError
from modelfactory.core.specs import FactorySpec, load_spec, parse_spec

FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: JSON-like values: what a YAML file, a webhook or the Prefect UI can hand the parser.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)

VALID = {
    "name": "fuzz",
    "base": {"uri": "org/model", "revision": "main"},
    "adapters": [{"uri": "org/lora", "weight": 0.5}],
    "quantize": {"bits": 4, "group_size": 128, "calibration": {"num_samples": 16, "seq_len": 256}},
    "benchmark": {"device": "cpu", "perplexity": {"max_tokens": 4096}},
    "gate": {"max_ppl_increase_pct": 10.0},
    "publish": {"destination": "s3://bucket/prefix"},
}
#: Every field path of VALID, as key tuples (where a fuzzed value is planted).
PATHS = [
    ("name",), ("base",), ("base", "uri"), ("base", "revision"), ("adapters",), ("quantize",), ("quantize", "bits"),
    ("quantize", "group_size"), ("quantize", "damp_percent"), ("quantize", "calibration"),
    ("quantize", "calibration", "num_samples"), ("quantize", "calibration", "seq_len"),
    ("quantize", "calibration", "text"), ("benchmark",), ("benchmark", "device"), ("benchmark", "perplexity"),
    ("benchmark", "perplexity", "stride"), ("gate",), ("gate", "max_ppl_increase_pct"), ("gate", "bogus_metric"),
    ("publish",), ("publish", "destination"), ("publish", "revision"), ("trust_remote_code",), ("unknown_field",),
]


def parses_or_spec_error(data: object) -> None:
    try:
        spec = parse_spec(data)  # type: ignore[arg-type]
    except SpecError as exc:
        assert exc.message.strip(), "a SpecError must say what is wrong"
        return
    assert isinstance(spec, FactorySpec)
    assert parse_spec(spec.model_dump(mode="json")) == spec  # what parses round-trips


@FUZZ
@given(json_values)
def test_arbitrary_values_never_crash_the_parser(data):
    parses_or_spec_error(data)


@FUZZ
@given(st.sampled_from(PATHS), json_values)
def test_one_bad_field_in_a_valid_spec_is_a_spec_error_or_valid(path, value):
    data = copy.deepcopy(VALID)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    parses_or_spec_error(data)


@FUZZ
@given(st.sampled_from(PATHS))
def test_deleting_any_field_is_a_spec_error_or_valid(path):
    data = copy.deepcopy(VALID)
    node = data
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1], None)
    parses_or_spec_error(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_spec_file_bytes_never_crash_load_spec(tmp_path: Path, content: bytes):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    try:
        load_spec(path)
    except SpecError:
        pass
