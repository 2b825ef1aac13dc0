"""Canonical JSON, step keys, folder hashes, and keyed step folders built atomically."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from modelfactory.core import workdir
from modelfactory.core.hashing import canonical_json, step_key, tree_sha256
from modelfactory.core.manifest import content_digest
from modelfactory.core.specs import QuantSpec


# --------------------------------------------------------------------------- hashing
def test_canonical_json_ignores_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":null,"y":[1,2]},"b":1}'


def test_canonical_json_of_models_equals_their_dump():
    spec = QuantSpec(bits=8)
    assert canonical_json(spec) == canonical_json(spec.model_dump(mode="json"))
    assert canonical_json({"q": spec}) == canonical_json({"q": spec.model_dump(mode="json")})


def test_step_key_is_stable_and_changes_with_every_input():
    base = dict(base="abc", adapters=[("s1", 1.0)], spec=QuantSpec())
    key = step_key("quantize", **base)
    assert key == step_key("quantize", spec=QuantSpec(), adapters=[("s1", 1.0)], base="abc")
    assert len(key) == 24
    variants = [
        step_key("merge", **base),
        step_key("quantize", **{**base, "base": "abd"}),
        step_key("quantize", **{**base, "adapters": [("s1", 0.5)]}),
        step_key("quantize", **{**base, "adapters": [("s2", 1.0)]}),
        step_key("quantize", **{**base, "spec": QuantSpec(bits=8)}),
        step_key("quantize", **{**base, "spec": QuantSpec(calibration={"seed": 1})}),
        step_key("quantize", **base, extra=None),
    ]
    assert key not in variants
    assert len(set(variants)) == len(variants)


def test_step_key_rejects_unhashable_values():
    with pytest.raises(TypeError, match="cannot hash object"):
        step_key("x", value=object())


def test_tree_sha256_tracks_content_and_ignores_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    first = tree_sha256(tmp_path)
    assert first == tree_sha256(tmp_path)

    (tmp_path / ".hidden").write_text("ignored")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("ignored too")
    (tmp_path / "sub" / ".lock").write_text("ignored")
    assert tree_sha256(tmp_path) == first

    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x02")
    changed = tree_sha256(tmp_path)
    assert changed != first

    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert tree_sha256(tmp_path) == first
    (tmp_path / "sub" / "b.bin").rename(tmp_path / "sub" / "c.bin")  # same bytes, new name
    assert tree_sha256(tmp_path) != first
    (tmp_path / "sub" / "c.bin").rename(tmp_path / "sub" / "b.bin")
    (tmp_path / "new.txt").write_text("")  # an added empty file counts
    assert tree_sha256(tmp_path) != first


# --------------------------------------------------------------------------- workdir
def _entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_building_success_renames_into_place_with_marker(tmp_path):
    assert workdir.completed("step", "k1", root=tmp_path) is None
    with workdir.building("step", "k1", root=tmp_path) as (tmp, marker):
        assert tmp.is_dir() and tmp.parent == tmp_path / "step"
        assert tmp.name.startswith(".k1.tmp-")
        assert workdir.completed("step", "k1", root=tmp_path) is None  # not visible while building
        (tmp / "out.txt").write_text("result")
        marker["answer"] = 42
    final = tmp_path / "step" / "k1"
    assert _entries(tmp_path / "step") == ["k1"]  # no tmp folder left behind
    assert (final / "out.txt").read_text() == "result"
    assert workdir.completed("step", "k1", root=tmp_path) == final
    marker = workdir.read_marker(final)
    assert marker == {"step": "step", "key": "k1", "answer": 42, "total_bytes": 6,
                      "files": [{"path": "out.txt", "size": 6, "sha256": hashlib.sha256(b"result").hexdigest()}]}
    assert workdir.marker_content(marker) == content_digest(marker["files"])
    assert json.loads((final / workdir.MARKER).read_text())["answer"] == 42


def test_building_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with workdir.building("step", "k2", root=tmp_path) as (tmp, marker):
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert _entries(tmp_path / "step") == []
    assert workdir.completed("step", "k2", root=tmp_path) is None


def test_building_keyboard_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with workdir.building("step", "k3", root=tmp_path) as (tmp, _):
            (tmp / "partial.txt").write_text("half")
            raise KeyboardInterrupt
    assert _entries(tmp_path / "step") == []


def test_completed_ignores_incomplete_folders(tmp_path):
    (tmp_path / "step" / "half").mkdir(parents=True)
    (tmp_path / "step" / "half" / "weights.bin").write_text("x")
    assert workdir.completed("step", "half", root=tmp_path) is None
    assert workdir.completed("step", "missing", root=tmp_path) is None
    assert workdir.completed("other", "half", root=tmp_path) is None


def test_building_replaces_an_incomplete_folder(tmp_path):
    stale = tmp_path / "step" / "k4"
    stale.mkdir(parents=True)
    (stale / "leftover.txt").write_text("from a crashed run")
    with workdir.building("step", "k4", root=tmp_path) as (tmp, _):
        (tmp / "fresh.txt").write_text("new")
    assert _entries(stale) == sorted(["fresh.txt", workdir.MARKER])
    assert workdir.completed("step", "k4", root=tmp_path) == stale


def test_building_keeps_a_folder_completed_concurrently(tmp_path):
    with workdir.building("step", "k5", root=tmp_path) as (tmp, _):
        (tmp / "mine.txt").write_text("second")
        # Another identical run finishes first.
        with workdir.building("step", "k5", root=tmp_path) as (other, _):
            (other / "theirs.txt").write_text("first")
    final = tmp_path / "step" / "k5"
    assert _entries(final) == sorted(["theirs.txt", workdir.MARKER])
    assert _entries(tmp_path / "step") == ["k5"]


def test_step_dir_defaults_to_settings_work_dir(factory_home):
    assert workdir.step_dir("merge", "abc") == factory_home / "work" / "merge" / "abc"


def test_building_adopts_an_output_committed_between_its_check_and_its_rename(tmp_path, monkeypatch):
    """Two builders of one key (two hosts on a shared work dir, or two sweep members with one quantize
    key): the other commits right between this one's check and its rename. This one keeps theirs,
    it does not fail (issue 24.1)."""
    real_replace = os.replace
    raced: list[str] = []

    def racing_replace(src, dst):
        if str(dst).endswith("k6") and not raced:
            raced.append(str(src))
            with workdir.building("step", "k6", root=tmp_path) as (other, _):  # the other builder wins
                (other / "theirs.txt").write_text("first")
        return real_replace(src, dst)

    monkeypatch.setattr(workdir.os, "replace", racing_replace)
    with workdir.building("step", "k6", root=tmp_path) as (tmp, _):
        (tmp / "mine.txt").write_text("second")
    final = tmp_path / "step" / "k6"
    assert _entries(final) == sorted(["theirs.txt", workdir.MARKER])
    assert _entries(tmp_path / "step") == ["k6"]  # no temporary folder left
