"""Step 6, publish: manifests and the file:// artifact store, down to a store that runs out of disk.

The S3 and Hub destinations: test_s3.py and test_hub.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelfactory.core.errors import DiskFullError, PublishError, SpecError
from modelfactory.core.manifest import (
    MANIFEST,
    build_manifest,
    content_digest,
    manifest_bytes,
    manifest_digest,
    verify_folder,
)
from modelfactory.interfaces.runner import run_factory
from modelfactory.publishing import local as store
from modelfactory.publishing.destinations import destination_kind
from modelfactory.publishing.local import local_root, publish_local, safe_join
from modelfactory.testing.catalog import latest_run
from modelfactory.testing.disks import small_disk
from modelfactory.testing.models import TINY_GATE, tiny_spec

PARTS = ("SmolLM2-135M", "gptq-4bit-128g", "0123abcd")


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "step-output"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "sub" / "extra.txt").write_text("nested")
    (folder / "_COMPLETE.json").write_text('{"step": "quantize"}')
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- manifest
def test_build_manifest_lists_files_with_size_and_sha(model_dir):
    manifest = build_manifest(model_dir, name="x", metrics={"ppl": 1.5})
    assert manifest["schema"] == 1
    assert manifest["name"] == "x" and manifest["metrics"] == {"ppl": 1.5}
    paths = [f["path"] for f in manifest["files"]]
    assert paths == ["config.json", "model.safetensors", "sub/extra.txt"]
    for entry in manifest["files"]:
        data = (model_dir / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["total_bytes"] == sum(len((model_dir / p).read_bytes()) for p in paths)


def test_manifest_bytes_are_canonical():
    a = manifest_bytes({"b": 1, "a": [1, 2]})
    assert a == manifest_bytes({"a": [1, 2], "b": 1})
    assert json.loads(a) == {"a": [1, 2], "b": 1}
    assert manifest_digest(a) == hashlib.sha256(a).hexdigest()


# --------------------------------------------------------------------------- publish
def test_publish_local_copies_and_writes_manifest(model_dir, tmp_path):
    root = tmp_path / "store"
    manifest = build_manifest(model_dir, name=PARTS[0])
    folder, digest, reused = publish_local(source=model_dir, root=root, parts=PARTS, manifest=manifest)
    assert folder == root.joinpath(*PARTS)
    assert reused is False
    published = _files(folder)
    assert published.pop(MANIFEST) == manifest_bytes(manifest)
    source = _files(model_dir)
    source.pop("_COMPLETE.json")
    assert published == source  # every artifact file, and no bookkeeping
    assert digest == hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    assert verify_folder(folder) == json.loads(manifest_bytes(manifest))
    assert not any(p.name.startswith(".") for p in folder.rglob("*"))  # no temporary manifest left


def test_second_identical_publish_is_a_noop(model_dir, tmp_path):
    root = tmp_path / "store"
    manifest = build_manifest(model_dir)
    folder, digest, _ = publish_local(source=model_dir, root=root, parts=PARTS, manifest=manifest)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    folder2, digest2, reused = publish_local(source=model_dir, root=root, parts=PARTS, manifest=manifest)
    assert (folder2, digest2, reused) == (folder, digest, True)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_manifest_is_written_last(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "store"
    dest = root.joinpath(*PARTS)
    seen = []
    real_copy = shutil.copy2

    def watching_copy(src, dst, *args, **kwargs):
        seen.append((dest / MANIFEST).exists())
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "copy2", watching_copy)
    publish_local(source=model_dir, root=root, parts=PARTS, manifest=build_manifest(model_dir))
    assert seen == [False, False, False]
    assert (dest / MANIFEST).is_file()


def test_failed_publish_leaves_no_partial_artifact(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "store"
    calls = []
    real_copy = shutil.copy2

    def failing_copy(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "copy2", failing_copy)
    with pytest.raises(PublishError, match="No space left on device"):
        publish_local(source=model_dir, root=root, parts=PARTS, manifest=build_manifest(model_dir))
    assert not root.joinpath(*PARTS).exists()

    # An interrupted publish (folder without manifest) is redone from scratch.
    monkeypatch.setattr(store.shutil, "copy2", real_copy)
    leftover = root.joinpath(*PARTS)
    leftover.mkdir(parents=True)
    (leftover / "junk.bin").write_bytes(b"half")
    folder, _, reused = publish_local(source=model_dir, root=root, parts=PARTS, manifest=build_manifest(model_dir))
    assert reused is False
    assert not (folder / "junk.bin").exists()
    verify_folder(folder)


def test_two_publishers_of_one_artifact_at_once_both_end_with_the_complete_artifact(model_dir, tmp_path, monkeypatch):
    """A second publisher starts while the first is still copying (two sweeps sharing a configuration):
    neither removes the other's files; one publishes, the other finds it complete (issue 24.3: the
    second `rmtree`d the folder the first was filling)."""
    root = tmp_path / "store"
    manifest = build_manifest(model_dir)
    real_copy = shutil.copy2
    second: list = []

    def copy_then_race(src, dst, *args, **kwargs):
        if not second:  # mid-copy of the first publisher, the second one runs to its end
            second.append("started")
            second[0] = publish_local(source=model_dir, root=root, parts=PARTS, manifest=manifest)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "copy2", copy_then_race)
    first = publish_local(source=model_dir, root=root, parts=PARTS, manifest=manifest)
    assert first[0] == second[0][0] and first[1] == second[0][1]
    assert sorted([first[2], second[0][2]]) == [False, True]  # one published, the other found it complete
    assert verify_folder(root.joinpath(*PARTS)) == json.loads(manifest_bytes(manifest))
    assert _entries_under(root) == sorted(f"{'/'.join(PARTS)}/{p}" for p in [MANIFEST, "config.json",
                                                                                "model.safetensors", "sub/extra.txt"])


def _entries_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_verify_folder_detects_changes(model_dir, tmp_path):
    folder, _, _ = publish_local(source=model_dir, root=tmp_path / "store", parts=PARTS,
                                 manifest=build_manifest(model_dir))
    verify_folder(folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(bytes([original[0] ^ 1]) + original[1:])  # same size, one bit flipped
    with pytest.raises(PublishError, match="model.safetensors does not match the manifest"):
        verify_folder(folder)
    weights.write_bytes(original + b"\0")
    with pytest.raises(PublishError, match="does not match"):
        verify_folder(folder)
    weights.write_bytes(original)
    verify_folder(folder)
    (folder / "sub" / "extra.txt").unlink()
    with pytest.raises(PublishError, match="extra.txt"):
        verify_folder(folder)


def test_verify_folder_refuses_files_that_are_not_the_ones_measured(model_dir, tmp_path):
    """Read-back: a manifest that says what was benchmarked (``content_sha256``) must list exactly those files."""
    measured = content_digest(build_manifest(model_dir)["files"])
    folder, _, _ = publish_local(source=model_dir, root=tmp_path / "store", parts=PARTS,
                                 manifest=build_manifest(model_dir, content_sha256=measured))
    verify_folder(folder)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    (other / "config.json").write_text("{}")
    folder, _, _ = publish_local(source=other, root=tmp_path / "store2", parts=PARTS,
                                 manifest=build_manifest(other, content_sha256=measured))
    with pytest.raises(PublishError, match="are not the files that were benchmarked"):
        verify_folder(folder)


def test_a_run_never_publishes_files_other_than_the_ones_it_benchmarked(prefect, tiny_llama, tiny_lora, tmp_path,
                                                                        monkeypatch):
    """Issue 24.3: publish fetched the quantized model by URI and published whatever it found there. Here
    it finds other bytes (another host's build, files changed after the benchmark): the run fails, names
    the mismatch, and publishes nothing."""
    import modelfactory.tasks.publish as publish_step
    from modelfactory import stage_store
    from modelfactory.testing.runs import passing_spec

    def tampered(uri: str) -> Path:
        copy = tmp_path / "tampered"
        if not copy.exists():
            shutil.copytree(stage_store.resolve(uri), copy)
            weights = next(copy.glob("*.safetensors"))
            data = bytearray(weights.read_bytes())
            data[-1] ^= 1
            weights.write_bytes(bytes(data))
        return copy

    monkeypatch.setattr(publish_step, "stage_store", SimpleNamespace(resolve=tampered))
    store_dir = tmp_path / "store"
    with pytest.raises(PublishError, match="are not the files that were benchmarked"):
        run_factory(passing_spec(tiny_llama, tiny_lora, name="tampered", publish={"destination": store_dir.as_uri()}))
    detail = latest_run()
    assert detail.status == "failed" and "not the files that were benchmarked" in detail.error
    assert not detail.publications and not store_dir.exists()


def test_verify_folder_without_manifest(tmp_path):
    with pytest.raises(PublishError, match="no manifest.json"):
        verify_folder(tmp_path)


# --------------------------------------------------------------------------- paths
@pytest.mark.parametrize("part", ["..", ".", "a/b", "a\\b", ".hidden", ""])
def test_safe_join_refuses_escaping_parts(tmp_path, part):
    with pytest.raises(SpecError, match="not allowed"):
        safe_join(tmp_path, "ok", part)


def test_safe_join_accepts_plain_names(tmp_path):
    assert safe_join(tmp_path, "SmolLM2-135M", "gptq-4bit-128g", "abc") == tmp_path / "SmolLM2-135M/gptq-4bit-128g/abc"


def test_local_root():
    assert local_root("file:///srv/store") == Path("/srv/store")
    assert local_root("file:///srv/my%20store") == Path("/srv/my store")
    assert local_root("/srv/plain") == Path("/srv/plain")
    assert local_root(Path("/srv/x").as_uri()) == Path("/srv/x")
    with pytest.raises(SpecError, match="not a local artifact store: use a file:// URL or a local path"):
        local_root("s3://bucket/models")
    with pytest.raises(SpecError):
        local_root("https://example.com/store")


@pytest.mark.parametrize(("url", "kind"), [("file:///srv/store", "file"), ("/srv/plain", "file"), ("store", "file"),
                                         ("s3://bucket/models", "s3"), ("hf://owner/repo", "hub")])
def test_destination_kind(url, kind):
    assert destination_kind(url) == kind


@pytest.mark.parametrize("url", ["gs://bucket/models", "https://example.com/store"])
def test_an_unknown_destination_scheme_names_the_supported_ones(url):
    with pytest.raises(SpecError, match="file:///folder .*s3://bucket/prefix or hf://owner/repo") as info:
        destination_kind(url)
    assert repr(url) in str(info.value)


def test_safe_join_refuses_a_symlink_leading_out_of_the_store(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "name").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SpecError, match="outside the store"):
        safe_join(tmp_path / "store", "name", "gptq-4bit-128g", "key")


def test_publish_refuses_an_artifact_with_a_symlink_out_of_it(model_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (model_dir / "leak.txt").symlink_to(secret)
    try:
        with pytest.raises(PublishError, match="symlink to .*outside the artifact folder"):
            build_manifest(model_dir)
    finally:
        (model_dir / "leak.txt").unlink()


# --------------------------------------------------------------------------- a full store (a real 1 MiB tmpfs; needs root)


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


def test_factory_run_with_a_full_store_fails_clearly_and_publishes_nothing(prefect, tiny_llama, tmp_path):
    with small_disk(tmp_path / "disk", size="256k") as disk:
        spec = tiny_spec(tiny_llama, name="disk-full", gate=TINY_GATE, publish={"destination": disk.as_uri()})
        with pytest.raises(DiskFullError):
            run_factory(spec)
        detail = latest_run()
        assert (detail.status, detail.error_kind) == ("failed", "disk_full")
        assert "ran out of disk space" in detail.error
        assert not detail.artifacts and not detail.publications
        assert not [p for p in disk.rglob("*") if p.is_file()]
