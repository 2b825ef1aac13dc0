"""S3 publishing, verification and sources against a real S3 HTTP API (moto server on loopback, boto3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelfactory.core.errors import (
    PublishError,
    SourceError,
    SourceNotFoundError,
    SpecError,
    TransientError,
)
from modelfactory.core.log import get_logger
from modelfactory.core.manifest import MANIFEST, build_manifest, content_digest
from modelfactory.core.specs import AdapterSpec, ModelSource
from modelfactory.publishing.artifacts import download_artifact, verify_artifact
from modelfactory.publishing.s3 import abort_stale_uploads, publish_s3
from modelfactory.s3 import S3Url, fetch_source, verify_s3
from modelfactory.testing.env import REPO, free_port, settings_env
from modelfactory.testing.models import TINY_GATE, tiny_spec
from modelfactory.testing.s3_server import MotoS3, s3_environment
from modelfactory.tasks.download import download_model, resolve_adapter

get_logger()  # bind the stderr log handler before CliRunner swaps the streams
MIB = 1 << 20


def make_artifact(folder: Path, *, big_mb: int = 12, seed: int = 0) -> Path:
    """A model-shaped folder: a multipart-sized safetensors file plus small JSON files."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(rng.randbytes(big_mb * MIB + 12345))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("nested file")
    return folder


def parts_of(folder: Path) -> tuple[str, str, str]:
    """An artifact's (name, config, key): S3 artifacts are keyed by the content digest of their files."""
    return "tiny", "gptq-4bit-32g", content_digest(build_manifest(folder)["files"])


def manifest_for(folder: Path) -> dict:
    name, config, key = parts_of(folder)
    return build_manifest(folder, name=name, config=config, key=key, spec={}, metrics={})


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def multipart_uploads(client, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture()
def small_parts(set_env):
    """5 MiB parts (S3's minimum) so a 12 MiB file is a 3-part multipart upload."""
    set_env(MODELFACTORY_S3_PART_SIZE_MB="5")


# --------------------------------------------------------------------------- publish + read back
def test_publish_verify_download_and_republish(s3_env, s3_bucket, small_parts, tmp_path):
    source = make_artifact(tmp_path / "artifact")
    manifest = manifest_for(source)
    url = f"s3://{s3_bucket}/models"
    PARTS = parts_of(source)
    pub = publish_s3(source=source, url=url, parts=PARTS, manifest=manifest)
    final = f"s3://{s3_bucket}/models/{'/'.join(PARTS)}/"
    assert (pub.uri, pub.destination, pub.reused, pub.size_bytes) == (final, "s3", False, manifest["total_bytes"])

    client = s3_env.client()
    prefix = f"models/{'/'.join(PARTS)}/"
    assert keys(client, s3_bucket) == sorted([prefix + p for p in ("config.json", "model.safetensors",
                                                                    "sub/extra.txt", "tokenizer.json", MANIFEST)]
                                             + ["models/tiny/gptq-4bit-32g/latest.json"])  # nothing else
    assert multipart_uploads(client, s3_bucket) == []
    head = client.head_object(Bucket=s3_bucket, Key=prefix + "model.safetensors", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] and head["ETag"].strip('"').endswith("-3")  # 3 parts, each SHA-256 checked
    latest = json.loads(client.get_object(Bucket=s3_bucket, Key="models/tiny/gptq-4bit-32g/latest.json")["Body"].read())
    assert latest["uri"] == final and latest["manifest_sha256"] == pub.manifest_sha256

    checked = verify_artifact(uri=final)
    assert checked["manifest_sha256"] == pub.manifest_sha256 and len(checked["files"]) == 4
    assert verify_s3(url=f"s3://{s3_bucket}/models/tiny/gptq-4bit-32g")["uri"] == final  # via latest.json

    got = download_artifact(uri=final, dest=tmp_path / "copy")
    assert not got["reused"]
    for entry in manifest["files"]:
        assert (tmp_path / "copy" / entry["path"]).read_bytes() == (source / entry["path"]).read_bytes()
    assert (tmp_path / "copy" / MANIFEST).is_file()
    assert download_artifact(uri=final, dest=tmp_path / "copy")["reused"]

    before = client.head_object(Bucket=s3_bucket, Key=prefix + MANIFEST)["LastModified"]
    time.sleep(1.1)
    again = publish_s3(source=source, url=url, parts=PARTS, manifest=manifest_for(source))
    assert again.reused and again.uri == final and again.manifest_sha256 == pub.manifest_sha256
    assert client.head_object(Bucket=s3_bucket, Key=prefix + MANIFEST)["LastModified"] == before


def test_cli_verify_and_download_s3_and_file(s3_env, s3_bucket, tmp_path):
    from modelfactory.interfaces.cli.main import app
    from modelfactory.publishing.local import publish_local

    source = make_artifact(tmp_path / "artifact", big_mb=1)
    PARTS = parts_of(source)
    pub = publish_s3(source=source, url=f"s3://{s3_bucket}/m", parts=PARTS, manifest=manifest_for(source))
    runner = CliRunner()
    result = runner.invoke(app, ["artifact", "verify", pub.uri])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and pub.manifest_sha256 in result.output
    result = runner.invoke(app, ["artifact", "download", pub.uri, str(tmp_path / "dl"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["manifest_sha256"] == pub.manifest_sha256
    assert (tmp_path / "dl" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()

    folder, digest, _ = publish_local(source=source, root=tmp_path / "store", parts=PARTS, manifest=manifest_for(source))
    for args in (["verify", folder.as_uri()], ["download", folder.as_uri(), str(tmp_path / "dl2")]):
        result = runner.invoke(app, ["artifact", *args])
        assert result.exit_code == 0 and digest in result.output, result.output

    # corruption is caught, named, and exits 1
    s3_env.client().put_object(Bucket=s3_bucket, Key=S3Url.parse(pub.uri).key("tokenizer.json"), Body=b"{ }")
    result = runner.invoke(app, ["artifact", "verify", pub.uri])
    assert result.exit_code == 1 and "tokenizer.json" in result.output and "does not match" in result.output
    result = runner.invoke(app, ["artifact", "verify", f"s3://{s3_bucket}/nothing-here/"])
    assert result.exit_code == 1 and "has no manifest.json" in result.output


# --------------------------------------------------------------------------- failures
def test_upload_failing_midway_leaves_no_manifest_and_no_multipart_uploads(s3_env, s3_bucket, small_parts,
                                                                          tmp_path, monkeypatch):
    """The connection dies after 2 uploaded parts: TransientError, nothing visible, nothing dangling."""
    from botocore.exceptions import EndpointConnectionError

    import modelfactory.publishing.s3 as s3_publish

    source = make_artifact(tmp_path / "artifact", big_mb=30)  # 7 parts
    calls = {"parts": 0}

    def die_after_two_parts(**_):
        calls["parts"] += 1
        if calls["parts"] > 2:
            raise EndpointConnectionError(endpoint_url=s3_env.url)

    def client_with_fault():
        from modelfactory.s3.client import make_client

        client = make_client()
        client.meta.events.register("before-call.s3.UploadPart", die_after_two_parts)
        return client

    healthy = s3_publish.make_client
    monkeypatch.setattr(s3_publish, "make_client", client_with_fault)
    with pytest.raises(TransientError, match="cannot reach S3") as info:
        publish_s3(source=source, url=f"s3://{s3_bucket}/models", parts=parts_of(source), manifest=manifest_for(source))
    assert "s3://" in str(info.value) and s3_env.url in str(info.value)
    client = s3_env.client()
    assert calls["parts"] > 2
    assert multipart_uploads(client, s3_bucket) == []
    # No manifest, no latest.json: nothing a reader trusts. Small files that made it up stay under the
    # content-keyed prefix; the retry writes the same bytes there.
    assert not [k for k in keys(client, s3_bucket) if k.endswith((MANIFEST, "latest.json", "model.safetensors"))]

    monkeypatch.setattr(s3_publish, "make_client", healthy)  # the network is back: the retry publishes
    pub = publish_s3(source=source, url=f"s3://{s3_bucket}/models", parts=parts_of(source), manifest=manifest_for(source))
    assert not pub.reused and verify_s3(url=pub.uri)["manifest_sha256"] == pub.manifest_sha256


KILLED_PUBLISH = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import modelfactory.publishing.s3 as p
    from modelfactory.core.manifest import build_manifest, content_digest
    from modelfactory.s3.client import make_client

    def slow_client():
        client = make_client()
        state = {"n": 0}
        def stall(**_):
            state["n"] += 1
            if state["n"] == 2:
                print("UPLOADING", flush=True)
            if state["n"] >= 2:
                time.sleep(60)
        client.meta.events.register("before-call.s3.UploadPart", stall)
        return client

    p.make_client = slow_client
    source = Path(sys.argv[1])
    key = content_digest(build_manifest(source)["files"])
    manifest = build_manifest(source, name="tiny", config="gptq-4bit-32g", key=key)
    p.publish_s3(source=source, url=sys.argv[2], parts=("tiny", "gptq-4bit-32g", key), manifest=manifest)
""")


def test_killed_publish_leaves_no_manifest_and_its_uploads_are_aborted(s3_env, s3_bucket, small_parts, tmp_path):
    """SIGKILL mid-upload (no cleanup can run): no manifest; abort_stale_uploads removes the leftovers."""
    source = make_artifact(tmp_path / "artifact", big_mb=30)
    url = f"s3://{s3_bucket}/models"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISH, str(source), url], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "UPLOADING"
    finally:
        proc.kill()
        proc.wait()
    client = s3_env.client()
    assert not [k for k in keys(client, s3_bucket) if k.endswith(MANIFEST) or k.endswith("latest.json")]
    assert len(multipart_uploads(client, s3_bucket)) >= 1  # the killed process could not abort it
    assert abort_stale_uploads(url=url, older_than_s=0) >= 1
    assert multipart_uploads(client, s3_bucket) == []
    pub = publish_s3(source=source, url=url, parts=parts_of(source), manifest=manifest_for(source))
    assert verify_s3(url=pub.uri)["total_bytes"] == pub.size_bytes


def test_an_s3_artifact_key_that_is_not_its_content_digest_is_refused(s3_env, s3_bucket, tmp_path):
    """Issue 24.3: files went into the final prefix before the manifest race was decided, under a key that
    was a step key: two publishers with different bytes for one key could mix their files. The key is
    the content digest now, so every publisher of a key writes the same bytes; any other key is refused."""
    source = make_artifact(tmp_path / "artifact", big_mb=1)
    name, config, key = parts_of(source)
    with pytest.raises(PublishError, match="is not the content digest of its files"):
        publish_s3(source=source, url=f"s3://{s3_bucket}/models", parts=(name, config, "k" * 24),
                   manifest=manifest_for(source))
    assert keys(s3_env.client(), s3_bucket) == []


def test_two_publishers_of_one_s3_artifact_at_once_keep_the_first_manifest(s3_env, s3_bucket, tmp_path, monkeypatch):
    """A second publisher completes while the first is between its files and its manifest: the first
    finds the manifest there and reports reuse; the artifact verifies."""
    from modelfactory.s3 import folders

    source = make_artifact(tmp_path / "artifact", big_mb=1)
    url = f"s3://{s3_bucket}/models"
    real_put = folders.put_if_absent
    second: list = []

    def race_then_put(client, **kwargs):
        if kwargs["key"].endswith(MANIFEST) and not second:
            second.append("started")
            second[0] = publish_s3(source=source, url=url, parts=parts_of(source), manifest=manifest_for(source))
        return real_put(client, **kwargs)

    monkeypatch.setattr(folders, "put_if_absent", race_then_put)
    first = publish_s3(source=source, url=url, parts=parts_of(source), manifest=manifest_for(source))
    assert not second[0].reused and first.reused and first.manifest_sha256 == second[0].manifest_sha256
    assert verify_s3(url=first.uri)["manifest_sha256"] == first.manifest_sha256


def test_bad_credentials_missing_bucket_and_dead_endpoint_fail_clearly(s3_env, s3_bucket, tmp_path, monkeypatch):
    source = make_artifact(tmp_path / "artifact", big_mb=1)
    manifest, PARTS = manifest_for(source), parts_of(source)
    with pytest.raises(PublishError, match="bucket 'no-such-bucket' .* does not exist"):
        publish_s3(source=source, url="s3://no-such-bucket/models", parts=PARTS, manifest=manifest)
    with pytest.raises(SourceNotFoundError, match="bucket 'no-such-bucket' .* does not exist"):
        fetch_source(url="s3://no-such-bucket/base", what="base model")
    with pytest.raises(SourceNotFoundError, match="no objects under this prefix"):
        download_model(source=ModelSource(uri=f"s3://{s3_bucket}/empty/"))

    auth = MotoS3(auth=True)  # a server that checks credentials: ours are unknown to it
    try:
        with s3_environment(auth.url, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0", AWS_SECRET_ACCESS_KEY="nope-secret"):
            with pytest.raises(PublishError, match="refused the credentials") as info:
                publish_s3(source=source, url="s3://any-bucket/models", parts=PARTS, manifest=manifest)
            assert "nope-secret" not in str(info.value) and "AKIAWRONG" not in str(info.value)
            with pytest.raises(SourceError, match="refused the credentials"):
                download_model(source=ModelSource(uri="s3://any-bucket/base"))
    finally:
        auth.stop()

    dead = f"http://127.0.0.1:{free_port()}"
    with s3_environment(dead, AWS_MAX_ATTEMPTS="2"):
        with pytest.raises(TransientError, match="cannot reach S3"):
            publish_s3(source=source, url="s3://b/models", parts=PARTS, manifest=manifest)


# --------------------------------------------------------------------------- sources
def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(folder).as_posix()}")


def test_base_and_adapter_from_s3_prefixes(s3_env, s3_bucket, tiny_llama, tiny_lora, tmp_path):
    client = s3_env.client()
    upload_folder(client, tiny_llama, s3_bucket, "src/base")
    upload_folder(client, tiny_lora, s3_bucket, "src/lora")

    base = download_model(source=ModelSource(uri=f"s3://{s3_bucket}/src/base"))
    assert base.kind == "s3" and not base.reused and base.source_uri == f"s3://{s3_bucket}/src/base"
    for file in tiny_llama.iterdir():
        assert (Path(base.path) / file.name).read_bytes() == file.read_bytes()
    again = download_model(source=ModelSource(uri=f"s3://{s3_bucket}/src/base/"))
    assert again.reused and again.sha == base.sha and again.path == base.path

    adapter = resolve_adapter(spec=AdapterSpec(uri=f"s3://{s3_bucket}/src/lora", weight=0.5))
    assert (Path(adapter.path) / "adapter_config.json").is_file() and adapter.weight == 0.5
    assert adapter.sha != base.sha

    # a changed object changes the content identity: downloaded again
    client.put_object(Bucket=s3_bucket, Key="src/base/extra.txt", Body=b"new")
    changed = download_model(source=ModelSource(uri=f"s3://{s3_bucket}/src/base"))
    assert changed.sha != base.sha and not changed.reused and (Path(changed.path) / "extra.txt").is_file()

    # a published artifact (with manifest) is identified by its manifest's sha256, every file checked
    pub = publish_s3(source=tiny_llama, url=f"s3://{s3_bucket}/store", parts=parts_of(tiny_llama),
                     manifest=manifest_for(tiny_llama))
    from_artifact = download_model(source=ModelSource(uri=pub.uri))
    assert from_artifact.sha == pub.manifest_sha256 and (Path(from_artifact.path) / MANIFEST).is_file()

    client.put_object(Bucket=s3_bucket, Key=S3Url.parse(pub.uri).key("config.json"), Body=b"{}")  # corrupt it
    client.put_object(Bucket=s3_bucket, Key=S3Url.parse(pub.uri).key(MANIFEST),
                      Body=client.get_object(Bucket=s3_bucket, Key=S3Url.parse(pub.uri).key(MANIFEST))["Body"].read()
                      + b"\n")  # new manifest bytes → new key → a fresh download that must fail the hash check
    with pytest.raises(SourceError, match="config.json.*do not match the manifest"):
        download_model(source=ModelSource(uri=pub.uri))


# --------------------------------------------------------------------------- the whole flow


def test_factory_flow_sources_from_and_publishes_to_s3(prefect, moto_s3, tiny_llama, tiny_lora, tmp_path):
    from modelfactory.catalog import open_catalog
    from modelfactory.catalog.recovery import import_artifact
    from modelfactory.interfaces.runner import run_factory

    bucket = "flow-bucket"
    with s3_environment(moto_s3.url):
        client = moto_s3.client()
        client.create_bucket(Bucket=bucket)
        upload_folder(client, tiny_llama, bucket, "bases/tiny")
        upload_folder(client, tiny_lora, bucket, "adapters/tiny-lora")
        spec = tiny_spec(tiny_llama, adapters=[{"uri": f"s3://{bucket}/adapters/tiny-lora"}], gate=TINY_GATE,
                         publish={"destination": f"s3://{bucket}/store", "name": "tiny-s3"})
        spec["base"] = {"uri": f"s3://{bucket}/bases/tiny"}
        outcome = run_factory(spec)
        assert outcome.status == "passed", outcome
        assert outcome.artifact_uri.startswith(f"s3://{bucket}/store/tiny-s3/gptq-4bit-32g/")
        manifest = verify_artifact(uri=outcome.artifact_uri)
        assert {"config.json", "model.safetensors", "quantize_config.json"} <= {f["path"] for f in manifest["files"]}
        assert manifest["sources"]["base"]["uri"] == f"s3://{bucket}/bases/tiny"
        latest = json.loads(client.get_object(Bucket=bucket, Key="store/tiny-s3/gptq-4bit-32g/latest.json")
                            ["Body"].read())
        assert latest["uri"] == outcome.artifact_uri
        detail = open_catalog().get_run(outcome.run_id)
        assert detail.base_sha and detail.adapters[0]["uri"] == f"s3://{bucket}/adapters/tiny-lora"
        assert [a.uri for a in detail.artifacts] == [outcome.artifact_uri]

        got = download_artifact(uri=outcome.artifact_uri, dest=tmp_path / "model")
        assert json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["bits"] == 4
        assert got["manifest_sha256"] == manifest["manifest_sha256"]

        again = run_factory(spec)
        assert again.status == "passed" and again.artifact_uri == outcome.artifact_uri
        steps = {s.name: s.status for s in open_catalog().get_run(again.run_id).steps}
        assert steps["download"] == steps["quantize"] == steps["publish"] == "reused"

        # `modelfactory catalog import` re-records the run from the S3 manifest under the manifest's own
        # digest, the one the publish step recorded (it used to hash the verified dict, uri included).
        assert [p.manifest_sha256 for p in detail.publications] == [manifest["manifest_sha256"]]
        with open_catalog(f"sqlite:///{tmp_path / 'fresh' / 'catalog.db'}") as fresh:
            created = import_artifact(fresh, uri=outcome.artifact_uri)
            assert created.action == "created" and created.manifest_sha256 == manifest["manifest_sha256"]
            assert [p.manifest_sha256 for p in fresh.get_run(created.run_id).publications] == [
                manifest["manifest_sha256"]]
            assert import_artifact(fresh, uri=outcome.artifact_uri).action == "already-recorded"


def test_credentials_from_a_prefect_secret_block(prefect, moto_s3, tmp_path):
    """No AWS variables at all: the client signs with the keys stored in a Prefect Secret block."""
    from prefect.blocks.system import Secret

    from modelfactory.s3.client import make_client

    key_id, secret = "AKIAFROMSECRETBLOCK01", "secret-from-the-block-9f2"
    Secret(value={"aws_access_key_id": key_id, "aws_secret_access_key": secret, "region_name": "us-east-1"}).save(
        "mf-aws-test", overwrite=True)
    with s3_environment(moto_s3.url, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                        MODELFACTORY_AWS_CREDENTIALS_SECRET="mf-aws-test"):
        client = make_client()
        assert client._request_signer._credentials.access_key == key_id  # signed with the block's keys
        client.create_bucket(Bucket="from-block")
        source = make_artifact(tmp_path / "artifact", big_mb=1)
        publication = publish_s3(source=source, url="s3://from-block/models", parts=parts_of(source),
                                 manifest=manifest_for(source))
        assert publication.uri.startswith("s3://from-block/models/")

        with settings_env(MODELFACTORY_AWS_CREDENTIALS_SECRET="no-such-block"), pytest.raises(
                SpecError, match="Secret block 'no-such-block' could not be loaded") as info:
            make_client()
        assert secret not in str(info.value)
