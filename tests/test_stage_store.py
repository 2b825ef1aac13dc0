"""The stage store against a real S3 API (moto server): step outputs by URI, marker last,
a content-addressed fetch cache checked by sha256, records, and hosts that share no disk.

"Hosts" here are different work and cache dirs in one process (switched by environment); the
end-to-end hand-off through a real GPU pool is ``tests/test_stage_handoff.py``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from modelfactory import stage_store
from modelfactory.core import workdir
from modelfactory.core.errors import SpecError, StageStoreError
from modelfactory.core.hashing import file_sha256
from modelfactory.core.manifest import content_digest
from modelfactory.core.settings import get_settings
from modelfactory.s3 import folders
from modelfactory.stage_store import cache, remote


@contextmanager
def env(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        get_settings.cache_clear()
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        get_settings.cache_clear()


@pytest.fixture
def store(s3_bucket) -> str:
    return f"s3://{s3_bucket}/stage"


@contextmanager
def host(root: Path, store_url: str | None) -> Iterator[Path]:
    """One "host": its own work dir and stage cache under *root*, the given stage store."""
    with env(MODELFACTORY_WORK_DIR=str(root / "work"), MODELFACTORY_STAGE_CACHE_DIR=str(root / "cache"),
             MODELFACTORY_STAGE_STORE_URL=store_url):
        yield root


def build(step: str, key: str, files: dict[str, bytes], **marker) -> Path:
    with workdir.building(step, key) as (tmp, mark):
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        mark.update(marker)
    return workdir.step_dir(step, key)


FILES = {"model.safetensors": os.urandom(3 << 20), "config.json": b'{"a": 1}', "sub/tokenizer.json": b"{}"}


def object_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != workdir.MARKER}


# --------------------------------------------------------------------------- upload


def test_marker_is_written_last_after_every_file(store, s3_env, tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    make_client = remote.make_client

    def recording_client():
        client = make_client()
        client.meta.events.register("before-parameter-build.s3.*", lambda model, params, **_: calls.append(
            (model.name, params.get("Key", ""))))
        return client

    monkeypatch.setattr(remote, "make_client", recording_client)
    with host(tmp_path / "a", store):
        build("quantize", "k1", FILES, quantize_s=1.5)
        out = stage_store.publish("quantize", "k1")
    assert out.uri == f"{store}/quantize/k1/" and out.marker["quantize_s"] == 1.5
    writes = [(op, key) for op, key in calls if op in ("PutObject", "CreateMultipartUpload", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", "stage/quantize/k1/_COMPLETE.json"), writes
    assert {key.rsplit("/", 1)[-1] for _, key in writes[:-1]} == {"model.safetensors", "config.json", "tokenizer.json"}

    manifest = json.loads(s3_env.client().get_object(Bucket=store.split("/")[2],
                                                     Key="stage/quantize/k1/_COMPLETE.json")["Body"].read())
    assert manifest["schema"] == 1 and manifest["step"] == "quantize" and manifest["key"] == "k1"
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        rel: file_sha256(workdir.step_dir("quantize", "k1", root=tmp_path / "a" / "work") / rel) for rel in FILES}
    assert manifest["total_bytes"] == sum(len(v) for v in FILES.values())
    # The store's marker is the output's own _COMPLETE.json (one meaning) plus where its files are.
    local = workdir.read_marker(workdir.step_dir("quantize", "k1", root=tmp_path / "a" / "work"))
    assert {k: v for k, v in manifest.items() if k not in ("schema", "data", "host", "created_at")} == local
    assert local["quantize_s"] == 1.5 and out.content == content_digest(local["files"])


def test_failed_upload_leaves_no_marker_and_no_files(store, s3_env, tmp_path, monkeypatch):
    bucket = store.split("/")[2]
    with host(tmp_path / "a", store):
        build("merge", "k2", FILES, max_abs_logit_diff=0.0)
        make_manager = folders.make_manager

        class Boom:
            def __init__(self, client):
                self.real = make_manager(client)

            def __enter__(self):
                self.manager = self.real.__enter__()
                return self

            def upload(self, path, *args, **kwargs):
                if path.endswith("tokenizer.json"):  # the last file: the others are up or in flight
                    raise ConnectionError("network down")
                return self.manager.upload(path, *args, **kwargs)

            def __exit__(self, *exc):
                return self.real.__exit__(*exc)

        monkeypatch.setattr(folders, "make_manager", Boom)
        with pytest.raises(ConnectionError):
            stage_store.publish("merge", "k2")
        assert object_keys(s3_env, bucket, "stage/merge/") == []
        monkeypatch.undo()
    with host(tmp_path / "b", store):
        assert stage_store.find("merge", "k2") is None  # nothing half-uploaded is ever reused


# --------------------------------------------------------------------------- hosts without a shared disk


def test_output_built_on_one_host_is_reused_and_fetched_on_another(store, s3_env, tmp_path, monkeypatch):
    with host(tmp_path / "a", store):
        local_a = build("quantize", "k3", FILES, quantize_s=2.0)
        uri = stage_store.publish("quantize", "k3").uri
        assert stage_store.resolve(uri) == local_a  # the host that built it reads its own folder
    with host(tmp_path / "b", store):
        found = stage_store.find("quantize", "k3")
        assert found is not None and found.uri == uri and found.marker["quantize_s"] == 2.0
        assert not (tmp_path / "b" / "work").exists()  # found, not downloaded
        fetched = stage_store.resolve(uri)
        assert fetched.is_relative_to(tmp_path / "b" / "cache" / "objects")
        assert files_of(fetched) == FILES
        assert workdir.read_marker(fetched)["quantize_s"] == 2.0  # the step marker comes along

        def no_download(*_a, **_k):
            raise AssertionError("a cached output was downloaded again")

        monkeypatch.setattr(cache, "download_output", no_download)
        assert stage_store.resolve(uri) == fetched == found.folder()  # reused from the cache
        assert not list((tmp_path / "b" / "cache" / "objects").glob(".*.tmp-*"))


def test_corrupted_file_in_the_store_is_detected_and_not_cached(store, s3_env, tmp_path):
    bucket = store.split("/")[2]
    with host(tmp_path / "a", store):
        build("download", "k4", FILES)
        uri = stage_store.publish("download", "k4").uri
    manifest = json.loads(s3_env.client().get_object(Bucket=bucket, Key="stage/download/k4/_COMPLETE.json")["Body"].read())
    key = f"stage/download/k4/{manifest['data']}config.json"
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b'{"a": 2}')  # same size, other bytes
    with host(tmp_path / "b", store):
        with pytest.raises(StageStoreError, match=r"\['config.json'\] do not match .* corrupt"):
            stage_store.resolve(uri)
        objects = tmp_path / "b" / "cache" / "objects"
        assert [p.name for p in objects.iterdir() if not p.name.endswith((".lock", ".use"))] == []  # nothing kept


def test_concurrent_fetches_on_one_host_download_once(store, s3_env, tmp_path, monkeypatch):
    with host(tmp_path / "a", store):
        build("merge", "k5", FILES, max_abs_logit_diff=0.1)
        uri = stage_store.publish("merge", "k5").uri
    downloads = []
    real = cache.download_output

    def counting(*args, **kwargs):
        downloads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "download_output", counting)
    with host(tmp_path / "b", store):
        results: list[Path] = []
        threads = [threading.Thread(target=lambda: results.append(stage_store.resolve(uri))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(results) == 3 and len(set(results)) == 1 and len(downloads) == 1
    assert files_of(results[0]) == FILES


def test_two_hosts_completing_one_key_keep_the_first_output(store, s3_env, tmp_path):
    bucket = store.split("/")[2]
    with host(tmp_path / "a", store):
        build("quantize", "k6", {"w.bin": b"from host a"}, quantize_s=1.0)
    with host(tmp_path / "b", store):
        build("quantize", "k6", {"w.bin": b"from host b!"}, quantize_s=9.0)  # GPUs are not bit-reproducible
    with host(tmp_path / "a", store):
        uri = stage_store.publish("quantize", "k6").uri
    with host(tmp_path / "b", store):
        theirs = stage_store.publish("quantize", "k6")  # b's upload lost the marker race
        assert theirs.uri == uri and theirs.adopted and theirs.marker["quantize_s"] == 1.0
        # One step key, one output everywhere: b reads a's bytes from now on, never its own (issue 24.1).
        assert files_of(stage_store.resolve(uri)) == {"w.bin": b"from host a"}
        assert workdir.completed("quantize", "k6") is None
    files = object_keys(s3_env, bucket, "stage/quantize/k6/")
    assert len(files) == 2, files  # the marker and a's one file: b's attempt was removed
    with host(tmp_path / "c", store):
        assert files_of(stage_store.resolve(uri)) == {"w.bin": b"from host a"}
        assert stage_store.find("quantize", "k6").marker["quantize_s"] == 1.0


def test_a_local_output_that_differs_from_the_store_is_replaced_by_the_stored_one(store, s3_env, tmp_path):
    """Host b finds its own finished output, but the store holds another host's for that key (b's upload
    was lost, or b built it while a uploaded): b adopts the stored one, checked by hash (issue 24.1)."""
    with host(tmp_path / "a", store):
        build("quantize", "k8", {"w.bin": b"from host a"}, quantize_s=1.0)
        uri = stage_store.publish("quantize", "k8").uri
    with host(tmp_path / "b", store):
        build("quantize", "k8", {"w.bin": b"from host b!"}, quantize_s=9.0)
        found = stage_store.find("quantize", "k8")
        assert found is not None and found.uri == uri and found.marker["quantize_s"] == 1.0
        assert files_of(found.folder()) == {"w.bin": b"from host a"}
        assert found.content == stage_store.find("quantize", "k8").content


def test_a_folder_outside_the_work_dir_is_shared_by_uri(store, s3_env, tmp_path):
    model = tmp_path / "my-model"
    for rel, data in FILES.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_bytes(data)
    with host(tmp_path / "a", store):
        uri = stage_store.share(model, step="download", key="src1", marker={"source": str(model)})
        assert uri == f"{store}/download/src1/"
        assert stage_store.resolve(uri) == model.resolve()  # this host: the folder itself, no copy
    with host(tmp_path / "b", store):
        fetched = stage_store.resolve(uri)
        assert files_of(fetched) == FILES and workdir.read_marker(fetched)["source"] == str(model)


def test_records_travel_through_the_store(store, s3_env, tmp_path):
    with host(tmp_path / "a", store):
        where = stage_store.write_record("gpu-stage/runs/r1.json", b'{"ok": true}')
        assert where == stage_store.record_location("gpu-stage/runs/r1.json") == f"{store}/gpu-stage/runs/r1.json"
    with host(tmp_path / "b", store):
        assert stage_store.read_record("gpu-stage/runs/r1.json") == b'{"ok": true}'
        assert stage_store.read_record("gpu-stage/runs/nope.json") is None
    assert not (tmp_path / "a" / "work").exists() and not (tmp_path / "b" / "work").exists()


# --------------------------------------------------------------------------- no store: today's behaviour


def test_without_a_store_outputs_are_local_paths(tmp_path):
    with host(tmp_path / "a", None):
        assert not stage_store.configured()
        folder = build("merge", "k7", FILES, max_abs_logit_diff=0.2)
        out = stage_store.find("merge", "k7")
        assert out is not None and out.uri == str(folder) and out.marker["max_abs_logit_diff"] == 0.2
        assert stage_store.resolve(out.uri) == folder
        assert stage_store.find("merge", "nope") is None
        assert stage_store.share(tmp_path, step="download", key="x", marker={}) == str(tmp_path)
        where = stage_store.write_record("gpu-stage/runs/r.json", b"{}")
        assert where == str(tmp_path / "a" / "work" / "gpu-stage" / "runs" / "r.json")
        assert stage_store.read_record("gpu-stage/runs/r.json") == b"{}"


def test_a_store_url_that_is_not_s3_is_refused(tmp_path):
    with host(tmp_path / "a", str(tmp_path / "store")), pytest.raises(
            SpecError, match="MODELFACTORY_STAGE_STORE_URL=.* s3://bucket/prefix"):
        stage_store.configured()


def test_a_missing_output_uri_says_what_to_do(store, s3_env, tmp_path):
    with host(tmp_path / "a", store), pytest.raises(StageStoreError, match="no completion marker .* run the factory"):
        stage_store.resolve(f"{store}/quantize/never-built/")


# --------------------------------------------------------------------------- a measurement refreshed everywhere


def test_benchmark_reuse_off_refreshes_the_stored_measurement_for_every_host(store, s3_env, tmp_path, tiny_llama):
    """``benchmark.reuse: false`` measures again and the fresh measurement replaces the stored one: no host
    reads the old one afterwards (issue 24.2: only the local marker was dropped)."""
    from modelfactory.core.records import ModelArtifact
    from modelfactory.core.specs import BenchmarkSpec
    from modelfactory.tasks.benchmark import BASELINE_STEP, benchmark_baseline
    from modelfactory.testing.models import tiny_spec

    bench = tiny_spec(tiny_llama)["benchmark"]
    bench["agreement"] = {"enabled": False}
    model = ModelArtifact(path=str(tiny_llama), sha="tiny-refresh", source_uri=str(tiny_llama), kind="merged")
    with host(tmp_path / "a", store):
        old = benchmark_baseline(model=model, spec=BenchmarkSpec.model_validate(bench))
    with host(tmp_path / "b", store):
        fresh = benchmark_baseline(model=model, spec=BenchmarkSpec.model_validate({**bench, "reuse": False}))
        assert not fresh.reused and fresh.metrics != old.metrics  # measured again (its timings differ)
    with host(tmp_path / "c", store):
        found = stage_store.find(BASELINE_STEP, fresh.key)
        assert found is not None and json.loads((found.folder() / "fp16.json").read_text()) == fresh.metrics.model_dump(
            mode="json")
        reused = benchmark_baseline(model=model, spec=BenchmarkSpec.model_validate(bench))
        assert reused.reused and reused.metrics == fresh.metrics


# --------------------------------------------------------------------------- a bounded cache (issue 24.7)

USER = """
import sys
from modelfactory import stage_store
for uri in sys.argv[1:]:
    stage_store.resolve(uri)
print("resolved", flush=True)
sys.stdin.readline()  # holds what it resolved until told to exit
"""


def test_the_cache_evicts_the_least_recently_used_entry_no_process_uses(store, s3_env, tmp_path):
    """The cache was never evicted: a GPU host filled its disk after enough models. Bounded now (here 2.5 MB
    for 1 MB outputs): fetching a third evicts the least recently used entry that no process uses."""
    import subprocess
    import sys

    uris = []
    with host(tmp_path / "a", store):
        for i in range(3):
            build("quantize", f"lru{i}", {"w.bin": os.urandom(1 << 20)})
            uris.append(stage_store.publish("quantize", f"lru{i}").uri)
    with host(tmp_path / "b", store), env(MODELFACTORY_STAGE_CACHE_MAX_GB="0.0025"):

        def user(*resolve: str) -> subprocess.Popen:
            proc = subprocess.Popen([sys.executable, "-c", USER, *resolve], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "resolved"
            return proc

        def done(proc: subprocess.Popen) -> None:
            proc.communicate("\n", timeout=60)

        objects = tmp_path / "b" / "cache" / "objects"

        def entries() -> set[str]:
            return {p.name for p in objects.iterdir() if p.is_dir() and not p.name.startswith(".")}

        done(user(uris[0]))  # used first, then no longer
        (first,) = entries()
        in_use = user(uris[1])  # still running: its entry must stay
        (second,) = entries() - {first}
        try:
            fetched = stage_store.resolve(uris[2])
            assert entries() == {second, fetched.name}  # the least recently used one not in use went
        finally:
            done(in_use)
        assert len(files_of(stage_store.resolve(uris[0]))) == 1  # evicted, so fetched again when needed
